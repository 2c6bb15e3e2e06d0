"""Paged attention over bf16 / fp8 / int8 KV caches: varlen prefill, decode, chunked prefill.

One kernel serves every case (prefill can take a specialised one, see
:data:`PREFILL_KERNEL`): the ``q_len`` queries of sequence ``i`` are the *last* ``q_len`` positions of a sequence of ``seq_lens[i]`` tokens whose K/V are already in the
paged cache (write them first with :func:`fp4comm.attention.write_kv_cache`). Prefill is
``q_len == seq_len``, decode ``q_len == 1``, chunked prefill anything in between.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import check_positive_int, check_same_device, check_tensor
from .._runtime import cdiv, triton_interpreting, use_triton
from ..reference import attention as ref
from ._common import check_format, check_kv_cache, check_scale_caches, dummy, next_pow2

SUPPORTED_HEAD_DIMS = (64, 128, 256)
Q_DTYPES = (torch.bfloat16, torch.float8_e4m3fn)
#: Keys a split must cover at least: below this, the combine pass and the per-program
#: prologue (Q load, descales) cost more than the parallelism gains.
MIN_KEYS_PER_SPLIT = 512
MAX_KV_SPLITS = 32


@dataclass(frozen=True)
class AttentionTiles:
    """Launch parameters of :func:`paged_attention`'s kernel (see :func:`attention_tiles`)."""

    block_q: int  # query tokens a program
    group_pad: int  # query heads per KV head, padded to a power of two
    block_n: int  # keys per inner-loop step
    num_warps: int
    num_stages: int
    kv_convert: int = 0  # fp8/int8 -> dot operand conversion on the GPU, see kv_convert_mode()
    kernel: str = "generic"  # "generic" | "fa" (prefill-specialised, one split), see PREFILL_KERNEL
    fa_q_smem: bool = False  # kernel "fa": BF16 queries unmodified, wgmma's A from shared memory
    bt_ldg: bool = False  # block-table reads of unmasked tiles outside Triton's pipeliner (K/V prefetched further)
    fuse_combine: bool = False  # split-KV: the last split program of a tile merges the splits (no combine pass)
    fa_tma: bool = False  # kernel "fa": K/V tiles by TMA where one page holds a tile (see fa_tensor_descriptors)

    @property
    def block_m(self) -> int:
        return self.block_q * self.group_pad


#: Kernel of prefill-shaped launches (``attention_tiles`` with M > 32 rows):
#:
#: * ``"generic"``: :func:`fp4comm.kernels.attention.paged_attention_kernel`, the kernel that
#:   also serves decode (and splits KV by :func:`select_num_kv_splits`: 2 splits plus a
#:   combine pass at one 8k sequence, 32 q / 8 KV heads, on 132 SMs). H200, 8k causal, D 128,
#:   bf16: 259 TFLOP/s at N = 64, 297 at N = 128 (SDPA 614).
#: * ``"fa"``: :func:`fp4comm.kernels.attention_prefill.paged_prefill_kernel`, laid out as
#:   the fast flash-attention forward kernels for Hopper (see its module docstring): one
#:   split, a grid ordered longest first over all programs, unmasked tiles without the
#:   ``-inf`` guard and the score scale folded into the exponent's FMA, the sliding window's
#:   inner tiles unmasked too. H200, same shape: 353 TFLOP/s at N = 128 (299 at N = 64; 402
#:   with 128-key pages, one block-table read a tile); fp8 cache at N = 64: 274 (generic 220).
#:   Session 9 (SDPA 618): 446 at pages of 16 (block-table entries read as one vector), 545
#:   with pages of 128 (K/V by TMA), see ``attention_tiles``; session 10: 529 at pages of 16,
#:   staged into pages of 128 (:data:`STAGE_PAGE`).
#:   The default; ``bench_attention.py --quick --only prefill`` times both (``tune`` rows).
#:
#: Per call: ``tiles=AttentionTiles(..., kernel="fa")``. An explicit ``num_kv_splits > 1``
#: always runs the generic kernel. The fa kernel's ``fa_q_smem`` (BF16 queries fed to wgmma
#: from shared memory) and ``bt_ldg`` (block-table reads outside Triton's pipeliner, so the
#: K/V copies run ``num_stages - 1`` tiles ahead of the compute instead of being issued at the
#: end of the previous tile and waited for at once; decode uses it too) are on by default
#: (:func:`attention_tiles`; the ``tune`` row "fa plain" times the kernel without them), see
#: :mod:`fp4comm.kernels.attention_prefill`.
PREFILL_KERNEL = "fa"
PREFILL_KERNELS = ("generic", "fa")

#: Conversion of fp8 cache tiles on the GPU (``CVT`` constexpr, see ``_kv_operand`` /
#: ``_kv_to_bf16`` in :mod:`fp4comm.kernels.attention`). Every mode reads a NaN code
#: (0x7F/0xFF) as NaN and every finite code exactly.
#:
#: * 0 = Triton's cast to BF16 (``cvt.rn.f16x2.e4m3x2`` + ``cvt.bf16.f16``: 1.5 F2F a value,
#:   a quarter-rate pipe on Hopper, and V read from shared memory a byte at a time);
#: * 1 = integer ops + one ``mul.bf16x2`` per pair to BF16, NaN fixed up by 6 more integer
#:   ops per 4 codes; V still byte-read;
#: * 2 = as 1 with V converted before its layout change (16-byte reads, a BF16 round trip
#:   through shared memory instead);
#: * 3 = FP16 dot operands: ``cvt.rn.f16x2.e4m3x2`` alone (0.5 F2F a value, NaN -> NaN in
#:   hardware), V converted before its layout change as in 2; queries are rescaled per row
#:   by a power of two (exact) into FP16's range and the probabilities rounded to FP16 (3
#:   more bits than BF16). The only mode besides 0 the interpreter runs (with portable
#:   conversions there), so the CPU tests cover its arithmetic.
#:
#: H200, b32 / 16k decode (before mode 3 and the NaN fix of 1/2): mode 0 588 us, 1 517 us,
#: 2 415 us. Mode 3 is the default on the strength of its instruction counts (see
#: :func:`kv_convert_mode`); ``bench_attention.py --quick`` times mode 2 beside it (``tune``
#: row ``cvt2``; b32 / 16k: 494.3 vs 373.0 us): flip this if another measures faster.
#:
#: Tried and removed (commit a583111): a mode 4 of 8-bit tensor-core QK dots, K never
#: converted, the query split per row into two E4M3 parts (int8: two s8 parts of a 14-bit
#: integer), V as in 3. H200, b32 / 16k, GQA 32 / 8, D 128, fp8: default (mode 3) 373.0 us,
#: mode 4 471.5, mode 4 at 8 warps 511.3, at N = 64 431.0, 8 splits of those two 480.7 /
#: 415.2; b128: default 1355.6, mode 4 at 8 warps 1807.8, at N = 64 1591.5. int8: a tie
#: (see :data:`INT8_CONVERT_GPU`).
FP8_CONVERT_GPU = 3
#: int8 on the GPU: 0 = Triton's cast through FP32 to BF16 (byte permutes + magic numbers,
#: then ``cvt.rn.bf16x2.f32``), hoisted past V's layout change (V byte-read from shared
#: memory); 2 = the same cast kept before it (``_keep_layout``); 3 = FP16 operands, exact
#: magic-number conversion (``(b ^ 0x80) | 0x6400`` as FP16 minus 1152: no F2F), V converted
#: before its layout change. H200 b32 / 16k, mode 0: 481 us; mode 3: 382.7 us (the removed
#: mode 4 above, s8 QK dots: 371.3, within noise).
INT8_CONVERT_GPU = 3
#: Modes the interpreter can run: the others use inline PTX (they fall back to 0 there).
INTERPRETER_MODES = (0, 3)


def kv_convert_mode(kv_format: str) -> int:
    """The ``CVT`` mode of the kernel for ``kv_format`` on the GPU: :data:`FP8_CONVERT_GPU`
    for fp8 caches, :data:`INT8_CONVERT_GPU` for int8, 0 for bf16.

    Why not Triton's cast: measured on H200 (mode 0), fp8 decode at b32/16k took 588 us =
    38% of HBM, no faster than bf16 with half the bytes: bound by the conversion. Compiled
    for sm_90 (decode tile M=16, N=128, D=128, 4 warps; ptxas): mode 0 has 222 registers (2
    programs an SM), per thread and tile 128 one-byte shared loads and 384 F2F; mode 2 has
    166 registers (3 programs an SM), no byte loads, no F2F (before its NaN fix: 2 ``prmt`` +
    2 ``mul.bf16x2`` + 4 integer ops per 4 values; now 6 more); mode 3 has 128 F2F per thread
    and tile (one ``cvt.rn.f16x2.e4m3x2`` per 2 values, on the conversion pipe, leaving the
    integer/FMA pipes to the rest of the loop), no byte loads. int8 mode 0: 218 registers,
    128 byte loads; mode 2: 166, none; mode 3: no F2F, no byte loads. The interpreter runs
    mode 3 (portable conversions) or 0 (:data:`INTERPRETER_MODES`). Flip the constants (or
    pass ``tiles=``) if the GPU measures another mode faster."""
    return {"fp8": FP8_CONVERT_GPU, "int8": INT8_CONVERT_GPU}.get(ref.base_format(kv_format), 0)


def effective_convert_mode(kv_convert: int, kv_format: str, interpreting: bool) -> int:
    """The ``CVT`` the kernel is launched with: 0 for bf16 caches (nothing to convert), and
    under the interpreter modes outside :data:`INTERPRETER_MODES` fall back to 0."""
    if ref.base_format(kv_format) == "bf16":
        return 0
    if kv_convert not in (0, 1, 2, 3):
        raise ValueError(f"tiles.kv_convert: must be 0, 1, 2 or 3, got {kv_convert}")
    if interpreting and kv_convert not in INTERPRETER_MODES:
        return 0
    return kv_convert


#: ``num_stages`` of fp8/int8 decode (head dim <= 128, N = 128), whose block-table reads
#: run outside Triton's pipeliner (``bt_ldg``, see ``_page_rows`` in
#: :mod:`fp4comm.kernels.attention`). With them inside (the old default), the K/V addresses
#: came from a block-table load of the same iteration and the pipeliner split the stages
#: over that two-load chain: at 3 stages the K/V ``cp.async`` of tile ``i + 1`` were issued
#: at the end of iteration ``i`` and waited for at the top of ``i + 1`` (74 KB shared, 168
#: registers, 3 programs an SM). Measured on H200 (b32 / b128 at 16k, fp8, L2 flushed by a
#: read): old 3 stages 366.6 / 1344.5 us; ``bt_ldg`` at 2 stages 352.2-353.4 / 1279.2-1286.5
#: (same 74 KB, the copies issued before the compute of the tile ahead); ``bt_ldg`` at 3
#: stages 370.5 / 1283.1 (K/V two tiles ahead, 106 KB shared: 2 programs an SM); 2 warps,
#: N = 64 at 3-4 stages, 8 or 32 splits (b32) and 2 or 8 (b128), and a grid with the KV
#: heads of a sequence adjacent: all slower or within 1%. Session-3 figures without
#: ``bt_ldg``: 5 stages 399 us, N = 64 at 5 / 7 stages 422 / 435 us. bf16 decode (N = 64)
#: keeps 3 stages: ``bt_ldg`` takes it from 544-545 / 2040 us to 505-507 / 1916 us (88% /
#: 93% of the 4.8 TB/s peak).
DECODE_ONE_BYTE_STAGES = 2

#: Decode programs of one warp (M = 16 query rows, head dim <= 128): keys per step
#: (``block_n``) of the static formats (bf16, fp8, int8) and of the dynamic ones, 3 stages.
#: With 4 warps the M = 16 tile is split across warps, so every key step waits on ~8
#: CTA-wide barriers (the row max and sum across warps, the probabilities' layout change,
#: V's trip through shared memory); with one warp those are warp shuffles and a
#: single-warp barrier, and the small programs (fp8, N = 16: 159 registers, 16 KB shared)
#: fit 12 to an SM instead of 3, the latency of each tile hidden by the others. H200, GQA
#: 32 / 8, D 128, pages of 16, 16k context, b32 / b128, L2 flushed by a read (4 warps at
#: N = 128 / 64 before): fp8 362 / 1332 -> 291-297 / 1098-1145 us (75-77% / 78-82% of the
#: 4.8 TB/s peak, with 16 / 4 splits and the combine pass: b32's ~15 us of extra cost was
#: mostly 2.6 waves of programs that start together, see :func:`splits_for_slots`, and ~5 us
#: the combine pass, see :data:`FUSE_COMBINE_MAX_SPLITS`); int8 383 / 1410 -> 305 / 1150;
#: bf16 519 / 1999 -> 500 / 1943; fp8_dynamic 542 / 2035 -> 384 / 1441 (N = 32; N = 16 491 /
#: 1873). Other one-warp fp8 tiles, b32 /
#: b128: N = 32 at 3 stages 307 / 1138, at 2 or 4 stages 332-337 / 1203-1239; N = 16 at 2,
#: 4, 5, 6 stages 394 / 1491, 318 / 1182, 315 / 1168, 339 / 1257; N = 64 at 2 / 3 stages
#: 375 / 1348, 344 / 1221; 2 warps at N = 64 346 / 1254; N = 16 without ``bt_ldg`` 420 /
#: 1600; capped at 128 registers (16 programs an SM) 302 / 1139; 12 or 24 splits instead of
#: 16 within 2% (6, one full wave: 282, see :func:`splits_for_slots`). Not the block-table
#: reads: each tile's entry loaded one tile earlier still (a loop-carried ``ld.global.nc``),
#: or pages of 128 (one entry for 8 tiles), time the same (b32 292-293 / 291 us).
DECODE_ONE_WARP_BLOCK_N = 16
DECODE_ONE_WARP_BLOCK_N_DYNAMIC = 32


def attention_tiles(head_dim: int, group: int, max_seqlen_q: int, kv_format: str,
                    block_size: int | None = None) -> AttentionTiles:
    """Tile sizes of the paged-attention kernel, in one place with the reasons.

    * Rows (M) are (token, head-of-the-GQA-group) pairs, so one K/V tile read serves the
      whole group. ``tl.dot`` needs M >= 16. Prefill tiles are M = 128 rows for head dims
      <= 128 (the flash-attention shape on Hopper: 8 warps = 2 warpgroups of wgmma) and 64
      for 256 (the accumulator doubles). Decode (few query rows) uses the smallest M that
      holds ``max_seqlen_q * group_pad`` rows, >= 16: padding rows is wasted MMA work but
      decode is bound by cache bytes, not by MMA.
    * Decode at M = 16 and head_dim <= 128: one warp a program, 16 keys a step (32 for the
      dynamic formats), 3 stages: many small programs an SM instead of a few large ones,
      see :data:`DECODE_ONE_WARP_BLOCK_N`.
    * Keys per step (N), other decode tiles (M = 32, head_dim 256): 4 warps, each step
      moves 128 keys of 1-byte fp8/int8 at head_dim <= 128 (16 KB of K + 16 KB of V), 64
      keys of bf16 (the same bytes), halved at head_dim 256.
    * Keys per step, prefill: N = 128 at head_dim <= 64 and at 128 for 2-byte caches and
      (fa kernel) static fp8 caches, 64 for the other 1-byte caches at 128 (not timed at 128),
      32 at 256. fa, fp8 cache, 8k causal: N = 128 with ``bt_ldg`` 338 TFLOP/s vs N = 64
      274. ``fa_q_smem`` + ``bt_ldg`` (bf16): 379 vs 352 (pages of 16), 437 with pages of
      128 (one block-table read a tile). At D = 128 (sm_90, 8 warps, wgmma) N = 128 is ~250
      registers, with spills for fp8; H200, bf16, 8k causal: N = 128 353 TFLOP/s vs N = 64
      299 (fa kernel), 296 vs 259 (generic). Only the tiles on the causal diagonal are
      masked (see the kernels), and q tiles run longest first.
    * ``num_stages`` 3 (2 at head_dim 256) keeps shared memory under ~160 KB on H100/H200;
      4-warp fp8/int8 decode at head_dim <= 128: :data:`DECODE_ONE_BYTE_STAGES` (2), see there.
    * ``bt_ldg`` (block-table reads outside the pipeliner): decode and the fa prefill kernel.
    * ``kv_convert``: :func:`kv_convert_mode`.
    * ``fa_tma`` (fa kernel, 2-byte caches): K/V tiles by TMA where a page holds whole tiles
      (:func:`fa_tensor_descriptors`); with ``block_size`` 64 (< N) N drops to 64 so that it
      does. H200, one 8k causal sequence, D 128, bf16 (SDPA 618 TFLOP/s): pages of 128 545
      TFLOP/s with TMA vs 496 without; 256: 537; 64: 499 at N = 64 + TMA vs 485 at N = 128;
      32: 452, 16: 446 (no TMA: a tile spans several pages; the block-table entries of a
      tile are read as one vector instead, 377 before). fp8 caches keep the pointer loads
      (bs 128: 324 with TMA vs 343 without). ``paged_attention`` stages long prefill runs
      over bf16 pages smaller than a tile into 128-key pages first (``stage_kv``, see
      :data:`STAGE_PAGE`), which this kernel then reads by TMA.
    * ``kernel``: :data:`PREFILL_KERNEL` for prefill tiles (M > 32), else ``"generic"``.
    * ``fuse_combine`` (the generic kernel): split-KV launches merge their splits in the
      kernel, see :func:`~fp4comm.kernels.attention.paged_attention_kernel`.
    """
    check_positive_int("head_dim", head_dim)
    check_positive_int("group", group)
    check_positive_int("max_seqlen_q", max_seqlen_q, allow_zero=True)
    check_format(kv_format)
    if block_size is not None:
        check_positive_int("block_size", block_size)
    group_pad = next_pow2(group)
    prefill_m = 128 if head_dim <= 128 else 64
    block_m = min(max(next_pow2(max(1, max_seqlen_q) * group_pad), 16), prefill_m)
    block_m = max(block_m, group_pad)
    block_q = block_m // group_pad
    decode = block_m <= 32
    one_byte = ref.base_format(kv_format) in ("fp8", "int8")
    if decode:
        block_n = (128 if one_byte else 64) if head_dim <= 128 else (64 if one_byte else 32)
    else:
        wide = not one_byte or (kv_format == "fp8" and PREFILL_KERNEL == "fa")
        block_n = 128 if head_dim <= 64 or (head_dim <= 128 and wide) else 64 if head_dim <= 128 else 32
    kernel = "generic" if decode else PREFILL_KERNEL
    fa = kernel == "fa"  # fa_q_smem, bt_ldg: both measured faster on H200 (see the N bullet above)
    tma = fa and not one_byte
    if tma and block_size is not None and 64 <= block_size < block_n and block_size & (block_size - 1) == 0:
        block_n = block_size  # one page a tile: TMA-fed
    num_warps = 8 if block_m >= 128 else 4
    num_stages = 3 if head_dim <= 128 else 2
    if decode and block_m == 16 and head_dim <= 128:
        num_warps = 1
        block_n = DECODE_ONE_WARP_BLOCK_N_DYNAMIC if ref.is_dynamic(kv_format) else DECODE_ONE_WARP_BLOCK_N
    elif decode and one_byte and head_dim <= 128:
        num_stages = DECODE_ONE_BYTE_STAGES
    return AttentionTiles(block_q, group_pad, block_n, num_warps, num_stages, kv_convert_mode(kv_format), kernel,
                          fa_q_smem=fa, bt_ldg=fa or decode, fuse_combine=kernel == "generic", fa_tma=tma)


#: Programs an SM should get over a launch before splitting stops paying (the rule of
#: :func:`select_num_kv_splits`: int8 caches, MLA): with 3 (4-warp) to 12 (one-warp) decode
#: programs resident an SM, 16 is >= 1.3 to 5 waves.
KV_SPLIT_PROGRAMS_PER_SM = 16


def select_num_kv_splits(num_programs: int, max_seqlen_k: int, num_sms: int) -> int:
    """Split-KV factor: how many programs share one (sequence, q tile, KV head)'s keys (the
    rule of int8 caches and of :func:`~fp4comm.attention.mla_decode`; bf16 / fp8 caches use
    :func:`splits_for_slots`).

    Long-context decode has few programs (``num_seqs * num_kv_heads``, e.g. 32 x 8 = 256)
    each streaming megabytes. A 4-warp decode program (168 registers in the fp8 mode 3
    build) leaves room for ~3 resident per SM, a one-warp one (M = 16) for ~12, so
    ``num_programs`` of a few per SM run in 1-3 waves whose last one is partly empty (2048
    programs on 132 x 3 slots = 5.2 waves: the sixth runs 17% full). Split by the smallest
    power of two that gives >=
    :data:`KV_SPLIT_PROGRAMS_PER_SM` programs an SM (b32 x 8 KV heads at 16k: 16 splits of
    1024 keys = 256 KB of fp8 K+V each; b128: 4 splits), but never so far that a split
    covers fewer than :data:`MIN_KEYS_PER_SPLIT` keys (512 keys = 128 KB at head_dim 128,
    fp8: each program still streams >= 64 KB, and the combine pass, which moves ``splits *
    T * Hq * head_dim`` FP32 twice, stays ~1-2% of the cache bytes); at most
    :data:`MAX_KV_SPLITS`. Powers of two only (each value is a separate compiled kernel).
    Was ``>= 8 * num_sms`` programs (8 splits at b32, none at b128) before the fp8 kernel
    stopped being conversion-bound; ``bench_attention.py --quick`` times splits 4..32.
    """
    target = KV_SPLIT_PROGRAMS_PER_SM * num_sms
    if num_programs >= target or max_seqlen_k < 2 * MIN_KEYS_PER_SPLIT:
        return 1
    want = next_pow2(cdiv(target, max(1, num_programs)))
    cap = 1 << ((max_seqlen_k // MIN_KEYS_PER_SPLIT).bit_length() - 1)
    return max(1, min(want, cap, MAX_KV_SPLITS))


#: Cost of one more wave of split programs, in units of one program's time over a whole
#: sequence (the ramp of a wave whose programs all start together: first loads, pipeline
#: fill, the partial stores). 0.01 (fp8 b32 / 16k: 6 splits, one wave, 282 us vs 12 splits,
#: two waves, 287 us) let the model prefer 24 splits in 5 waves to 4 in one for int8 (10
#: programs an SM), measured 313-326 us vs 306 at 16 splits: more waves cost more than that.
SPLIT_WAVE_COST = 0.05

#: Most splits ``AttentionTiles.fuse_combine`` merges in the kernel (more: the separate
#: combine pass). The merging program reads every split's partial rows one split at a time,
#: in the launch's tail. H200, GQA 32 / 8, D 128, fused vs separate: b32 / 16k fp8 at 6
#: splits 277 vs 285-287 us, fp8_dynamic at 3 splits 361-363 vs 404, int8_dynamic at 3
#: 407-410 vs 437; at 8 splits (b64 / 4k) fp8 176 vs 159-161 and bf16 278 vs 262; at 16
#: (b32 / 16k) fp8 322 vs 294, bf16 527 vs 500.
FUSE_COMBINE_MAX_SPLITS = 6

#: Cache formats (base) whose decode splits come from :func:`splits_for_slots`; int8 caches
#: keep :func:`select_num_kv_splits`: H200, b32 / 16k, int8 at 5 splits (one wave of its
#: 10 programs an SM) 407 us vs 305 at 16, int8_dynamic at 64k 3 splits 1609-1705 vs
#: 1515-1562 at 16 (why longer int8 programs stream slower was not found). fp8, b32 / 16k:
#: 16 -> 6 splits 293 -> 277 us; fp8_dynamic 382 -> 361; bf16 at b64 / 4k 262 -> 254.
WAVE_SPLIT_FORMATS = ("bf16", "fp8")

#: Split counts :func:`splits_for_slots` picks from (each is a separate compiled kernel: the
#: split count is a ``constexpr``; as a runtime value the one-warp fp8 decode kernel took 192
#: registers instead of 159, 10 programs an SM instead of 12)
SPLIT_CHOICES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)

#: CTAs an SM holds at most (sm_80 / sm_90)
MAX_CTAS_PER_SM = 32
#: Resident decode programs an SM assumed under the interpreter (no compiled kernel to ask)
INTERPRETER_RESIDENT = 4
#: (device index, configuration) -> resident programs an SM of its split decode kernel
_RESIDENT: dict = {}


def splits_for_slots(num_programs: int, max_seqlen_k: int, slots: int) -> int:
    """Split-KV factor of the decode kernel from the programs the GPU holds at once.

    ``slots`` = resident programs an SM (from the compiled kernel's registers and shared
    memory, :func:`resident_programs`) x SMs. Decode programs are latency-bound: a program
    streams at about the same rate however many share its SM, so a launch takes ~``waves``
    x (its program's keys) where ``waves = ceil(num_programs * s / slots)``: the best
    split count fills whole waves. Minimizes ``waves * (1 / s + SPLIT_WAVE_COST)`` over
    the counts of :data:`SPLIT_CHOICES` up to ``max_seqlen_k // MIN_KEYS_PER_SPLIT``, the
    smallest on ties. H200, fp8, b32 x 8 KV heads at 16k, 12 one-warp programs an SM (1584
    slots): 6 splits (1536 programs, one wave) 282 us; 4 / 5 / 8 / 12 / 16 splits 307 / 309 /
    307 / 287 / 292 us. b128 (1024 programs): 3 splits (two full waves) 1087-1103 us; 1 / 2 / 4:
    1150-1166 / 1171-1179 / 1126-1153 us (all with the separate combine pass)."""
    if max_seqlen_k < 2 * MIN_KEYS_PER_SPLIT or num_programs <= 0:
        return 1
    best, best_cost = 1, None
    for splits in SPLIT_CHOICES:
        if splits > max_seqlen_k // MIN_KEYS_PER_SPLIT:
            break
        cost = cdiv(num_programs * splits, slots) * (1.0 / splits + SPLIT_WAVE_COST)
        if best_cost is None or cost < best_cost - 1e-9:
            best, best_cost = splits, cost
    return best


def resident_programs(compiled, device: torch.device) -> int:
    """Programs of a compiled Triton kernel one SM holds at once: the least of its register,
    shared-memory, thread and CTA limits (registers allocated per warp in units of 256)."""
    props = torch.cuda.get_device_properties(device)
    warps = compiled.metadata.num_warps
    regs_per_warp = cdiv(max(compiled.n_regs, 1) * 32, 256) * 256
    by_regs = props.regs_per_multiprocessor // (regs_per_warp * warps)
    by_threads = props.max_threads_per_multi_processor // (32 * warps)
    shared = compiled.metadata.shared + 1024  # + the CTA's reserved shared memory
    by_shared = props.shared_memory_per_multiprocessor // shared
    return max(1, min(by_regs, by_threads, by_shared, MAX_CTAS_PER_SM))


def check_descale(name: str, d: object, num_seqs: int, num_kv_heads: int, device: torch.device):
    """A descale: ``None`` (1), 0-dim / ``[1]`` (per tensor), ``[num_kv_heads]`` or
    ``[num_seqs, num_kv_heads]``, float32. Returns ``(tensor, stride_seq, stride_head)``."""
    if d is None:
        return dummy(device), 0, 0
    check_tensor(name, d, dtype=torch.float32, device=device)
    if d.dim() == 0 or (d.dim() == 1 and d.shape[0] == 1):
        return d.reshape(1), 0, 0
    if d.dim() == 1 and d.shape[0] == num_kv_heads:
        return d, 0, d.stride(0)
    if d.dim() == 2 and tuple(d.shape) == (num_seqs, num_kv_heads):
        return d, d.stride(0), d.stride(1)
    raise ValueError(
        f"{name}: expected a 0-dim, [1], [num_kv_heads={num_kv_heads}] or [num_seqs={num_seqs}, "
        f"num_kv_heads={num_kv_heads}] float32 tensor, got shape {list(d.shape)}"
    )


def check_block_table(block_table, seq_lens, num_blocks: int, block_size: int) -> None:
    """Entries a sequence uses (the first ``cdiv(seq_len, block_size)`` of its row) must
    lie in ``[0, num_blocks)``; the rest of the row is never read. One device sync."""
    if block_table.numel() == 0:
        return
    need = (seq_lens.long() + block_size - 1) // block_size
    used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < need[:, None]
    bad = used & ((block_table < 0) | (block_table >= num_blocks))
    if bool(bad.any()):
        i, j = (int(x) for x in bad.nonzero()[0])
        raise ValueError(
            f"block_table: entry [{i}, {j}] = {int(block_table[i, j])} is out of range [0, {num_blocks}) "
            f"(sequence {i} uses its first {int(need[i])} entries)"
        )


def _block_table_vector_reads(block_table: torch.Tensor, page: int, block_n: int) -> bool:
    """Whether the fa kernel reads a tile's block-table entries as one vector (``BT_VEC``, see
    ``_tile_pages_vec``): a tile spans 2, 4 or 8 whole power-of-two pages and every row's
    entries for a tile are aligned to the vector's size (8 or 16 bytes)."""
    n = block_n // page if 0 < page < block_n else 0
    align = 4 * min(n, 4)
    return (n in (2, 4, 8) and block_table.shape[1] >= n  # read-ahead past a row's end reads its first n
            and block_table.data_ptr() % align == 0 and block_table.stride(0) * 4 % align == 0)


def fa_tensor_descriptors(k_cache: torch.Tensor, v_cache: torch.Tensor, page: int, block_n: int):
    """TMA descriptors of the K and V caches for the fa kernel, or None where it must read
    them with pointer loads.

    Each cache is viewed as a 2-D array ``[num_blocks * block_size, num_kv_heads * head_dim]``
    (a row per slot) with a ``[block_n, head_dim]`` box: a tile of ``block_n`` keys of one
    head is one TMA copy when a page holds whole tiles (``page``, the power-of-two block
    size, a multiple of ``block_n``). That needs heads and dims packed within a slot, pages
    one after the other, and TMA's 16-byte alignment of the base and the row stride; caches
    laid out otherwise (and pages of fewer keys, a tile then spanning several) keep the
    pointer loads. H200, one 8k causal sequence, GQA 32 / 8, D 128, bf16, contiguous K/V
    (session 9 probe): a TMA-fed kernel 583 TFLOP/s vs 506 with pointer loads."""
    if page < block_n or page % block_n:
        return None
    nb, bs, hkv, d = k_cache.shape
    if nb * bs >= 2**31:
        return None
    for c in (k_cache, v_cache):
        es = c.element_size()
        if (c.stride(3) != 1 or c.stride(2) != d or c.stride(0) != bs * c.stride(1) or c.data_ptr() % 16
                or c.stride(1) * es % 16 or d * es < 16):
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor

    return tuple(TensorDescriptor.from_tensor(c.as_strided((nb * bs, hkv * d), (c.stride(1), 1)), [block_n, d])
                 for c in (k_cache, v_cache))


#: Prefill over pages smaller than a TMA tile: the fa kernel then reads each tile's
#: block-table entries before its K/V copies, a latency Triton's pipeliner cannot hide (H200,
#: one 8k causal sequence, GQA 32 / 8, D 128, bf16: 446 TFLOP/s at pages of 16 vs 489 with no
#: block-table reads at all and 545 with pages of 128 read by TMA). :func:`paged_attention`
#: then *stages* the sequences' pages first (:func:`stage_kv_pages`): one gather copies them
#: into a temporary cache of :data:`STAGE_PAGE`-key pages, which the kernel reads by TMA.
#: H200, same shape (SDPA 613), staged vs not, the copy included: pages of 16 529 vs 449
#: TFLOP/s, 32 533 vs 457, 64 533 vs 499 (N = 64 by TMA); pages of 128 541.
STAGE_PAGE = 128
#: Automatic staging (``stage_kv=None``) when a lower bound on the attention work a staged
#: (key, KV head) slot serves, in (query head, key) pairs (see :func:`stages_kv`), is at least
#: this: the copy moves 8 bytes a bf16 value (K and V, read and written, ~25 us for one 8k
#: sequence of 8 heads of 128) against ~15% of the attention's time saved. At this ratio the
#: saving is >= ~2.4x the copy's cost (HBM 4 TB/s vs 450 TFLOP/s).
STAGE_MIN_WORK = 4096
#: Automatic staging allocates at most this much for the staged K and V together.
STAGE_MAX_BYTES = 1 << 30


def runs_fa(tiles: AttentionTiles, num_kv_splits: int | None) -> bool:
    """Whether :func:`paged_attention` launches the prefill (fa) kernel for these tiles: an
    explicit ``num_kv_splits > 1`` always runs the generic one."""
    return tiles.kernel == "fa" and (num_kv_splits is None or num_kv_splits == 1)


def stages_kv(stage_kv: bool | None, fa_tma: bool, kv_format: str, block_size: int, max_blocks: int, T: int,
              num_seqs: int, num_heads: int, num_kv_heads: int, head_dim: int, causal: bool = True,
              sliding_window: int | None = None) -> bool:
    """Whether :func:`paged_attention` stages the pages (its ``stage_kv`` argument). Staging
    applies to TMA-fed fa launches (``fa_tma``: :func:`runs_fa` and ``tiles.fa_tma``) over a
    bf16 cache of power-of-two pages under :data:`STAGE_PAGE` keys; there ``stage_kv`` True /
    False decides, and ``None`` asks whether it pays, from shapes only (no device sync). The
    (query head, key) pairs are bounded below from ``T`` queries in ``num_seqs`` runs: a
    causal run of ``q`` queries attends to at least ``q^2 / 2`` keys (``q^2`` without
    causality), and ``sum q_i^2 >= T^2 / num_seqs``; a sliding window caps the keys a query
    sees. The staged slots are the block table's whole width (``max_blocks`` pages a
    sequence). ``stage_kv=True`` where staging cannot apply raises."""
    can = fa_tma and kv_format == "bf16" and block_size < STAGE_PAGE and not block_size & (block_size - 1)
    if stage_kv and not can:
        raise ValueError(f"stage_kv: needs the fa kernel with fa_tma over a bf16 cache whose pages hold fewer than "
                         f"{STAGE_PAGE} keys (a power of two), got {kv_format} pages of {block_size}, fa_tma={fa_tma}")
    if not can or stage_kv is not None:
        return can and bool(stage_kv)
    if num_seqs == 0 or T == 0:
        return False
    keys = T / num_seqs / (2 if causal else 1)
    if sliding_window is not None:
        keys = min(keys, sliding_window)
    slots = num_seqs * cdiv(max_blocks * block_size, STAGE_PAGE) * STAGE_PAGE
    return (T * num_heads * keys >= STAGE_MIN_WORK * slots * num_kv_heads
            and 2 * slots * num_kv_heads * head_dim * 2 <= STAGE_MAX_BYTES)  # bf16: 2 bytes a value


def launch_tiles(tiles: AttentionTiles | None, num_kv_splits: int | None, stage_kv: bool | None, kv_format: str,
                 block_size: int, max_blocks: int, T: int, num_seqs: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, max_seqlen_q: int, causal: bool = True,
                 sliding_window: int | None = None) -> tuple[AttentionTiles, bool]:
    """``(tiles, staged)`` of a :func:`paged_attention` call: the tiles it launches with
    (``tiles`` None: :func:`attention_tiles` for the pages the kernel reads, which are
    :data:`STAGE_PAGE`-key ones when staged) and :func:`stages_kv`'s decision."""
    auto = tiles is None
    if auto:
        tiles = attention_tiles(head_dim, num_heads // num_kv_heads, max_seqlen_q, kv_format, block_size)
    staged = stages_kv(stage_kv, runs_fa(tiles, num_kv_splits) and tiles.fa_tma, kv_format, block_size, max_blocks,
                       T, num_seqs, num_heads, num_kv_heads, head_dim, causal, sliding_window)
    if staged and auto:
        tiles = attention_tiles(head_dim, num_heads // num_kv_heads, max_seqlen_q, kv_format, STAGE_PAGE)
    return tiles, staged


def stage_kv_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, page: int = STAGE_PAGE):
    """Copy each sequence's pages into fresh caches of ``page``-key pages, one sequence after
    the other: returns ``(k, v, block_table)`` with ``k, v [num_seqs * n, page, num_kv_heads,
    head_dim]`` (packed, contiguous) and the block table ``[num_seqs, n]`` of ``arange``
    entries, ``n = cdiv(max_blocks * block_size, page)``. ``page`` must be a multiple of the
    cache's block size. Entries a sequence does not use may be anything (they are clamped
    into range and their pages copied, never read by the kernel)."""
    nb, bs = k_cache.shape[:2]
    if page % bs:
        raise ValueError(f"page: must be a multiple of the cache's block_size {bs}, got {page}")
    S, cols = block_table.shape
    n = cdiv(cols * bs, page)
    idx = block_table.clamp(0, nb - 1).long()
    if n * page // bs > cols:
        idx = torch.nn.functional.pad(idx, (0, n * page // bs - cols))
    idx = idx.reshape(-1)
    # H200, one 8k sequence, 8 KV heads of 128, pages of 16 / 32 / 64: these two gathers
    # 22.3-23.3 us (~2.9 TB/s read + written); the whole call 26-27 us with index_select
    # gathers on [num_blocks, page elements] views (as fast) in their place
    k, v = (c[idx].view(S * n, page, *c.shape[2:]) for c in (k_cache, v_cache))
    return k, v, torch.arange(S * n, dtype=torch.int32, device=block_table.device).view(S, n)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    *,
    kv_format: str,
    softmax_scale: float,
    causal: bool = True,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    k_scale_cache: torch.Tensor | None = None,
    v_scale_cache: torch.Tensor | None = None,
    sliding_window: int | None = None,
    max_seqlen_q: int | None = None,
    num_kv_splits: int | None = None,
    tiles: AttentionTiles | None = None,
    out: torch.Tensor | None = None,
    check_indices: bool = True,
    impl: str = "auto",
    stage_kv: bool | None = None,
) -> torch.Tensor:
    """Attention of varlen queries over a paged, possibly quantized, KV cache.

    Args:
        q: ``[T, num_heads, head_dim]`` ``bfloat16`` or ``float8_e4m3fn`` (then give
            ``q_descale``); ``head_dim`` in 64 / 128 / 256; last dim contiguous. The queries of
            sequence ``i`` are rows ``cu_seqlens_q[i]:cu_seqlens_q[i+1]``.
        k_cache, v_cache: ``[num_blocks, block_size, num_kv_heads, head_dim]`` in the dtype of
            ``kv_format``; ``num_heads % num_kv_heads == 0`` (GQA / MQA).
        block_table: ``[num_seqs, max_blocks]`` ``int32``: block of each page of each sequence.
        seq_lens: ``[num_seqs]`` ``int32``: tokens of each sequence in the cache (the queries
            included; 0 = empty).
        cu_seqlens_q: ``[num_seqs + 1]`` ``int32``, cumulative query counts, ``[0] == 0``,
            ``[-1] == T``.
        kv_format: ``"bf16" | "fp8" | "int8" | "fp8_dynamic" | "int8_dynamic"``.
        softmax_scale: multiplies ``q . k`` (typically ``head_dim ** -0.5``).
        causal: query at position ``p = seq_len - q_len + j`` sees keys ``<= p``; else all keys.
        q_descale, k_descale, v_descale: decode-direction FP32 factors (true value = stored *
            descale): 0-dim / ``[1]`` per tensor, ``[num_kv_heads]`` per KV head, or
            ``[num_seqs, num_kv_heads]``; every element is honoured. ``None`` = 1. For static
            fp8/int8 caches pass the cache's ``k_scale`` / ``v_scale`` here. ``q_descale *
            k_descale`` is folded into the score scale, ``v_descale`` into the output.
        k_scale_cache, v_scale_cache: dynamic formats: ``[num_blocks, block_size,
            num_kv_heads]`` FP32 per-(token, head) scales written by ``write_kv_cache``.
        sliding_window: ``w`` keys (the query's own position included), or ``None``.
        max_seqlen_q: the longest query run; computed from ``cu_seqlens_q`` (one device sync)
            when ``None``. Passing a smaller value than the truth leaves rows uncomputed.
        num_kv_splits: force the split-KV factor (1 to :data:`MAX_KV_SPLITS`); ``None`` =
            :func:`splits_for_slots` (bf16, fp8 caches), :func:`select_num_kv_splits` (int8).
        tiles: override :func:`attention_tiles` (benchmark sweeps); under the interpreter
            ``kv_convert`` 1 and 2 run as 0 (see :func:`effective_convert_mode`);
            ``kernel="fa"`` runs the prefill-specialised kernel (:data:`PREFILL_KERNEL`) unless
            ``num_kv_splits > 1`` is forced.
        out: optional ``[T, num_heads, head_dim]`` ``bfloat16`` output buffer.
        check_indices: validate ``seq_lens``, ``cu_seqlens_q`` and the used ``block_table``
            entries (device syncs); pass ``False`` on hot paths / CUDA graphs.
        impl: ``"auto" | "triton" | "reference"``.
        stage_kv: bf16 caches with pages of fewer than :data:`STAGE_PAGE` keys under the
            prefill (fa) kernel: copy the sequences' pages into a temporary cache of
            :data:`STAGE_PAGE`-key pages first (:func:`stage_kv_pages`; 2 x ``num_seqs x
            max_blocks x block_size`` slots, rounded up to whole pages), read by TMA. ``None``:
            when :func:`stages_kv` says it pays (long prefill runs: one 8k sequence at pages of
            16 goes from ~446 to ~530 TFLOP/s on H200); ``True``: always (``ValueError`` where it
            cannot apply); ``False``: never. Same answer bit for bit either way.

    Returns:
        ``[T, num_heads, head_dim]`` ``bfloat16``. Queries with no key to attend (a sequence
        whose ``q_len`` exceeds ``seq_len``, e.g. padded decode rows with ``seq_len == 0``)
        give zeros, never NaN.
    """
    check_format(kv_format)
    check_tensor("q", q, dtype=Q_DTYPES, ndim=3)
    dev = q.device
    T, Hq, D = q.shape
    if D not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head_dim must be one of {list(SUPPORTED_HEAD_DIMS)}, got {D}")
    if q.stride(-1) != 1:
        raise ValueError("q: the last (head_dim) dim must be contiguous")
    check_kv_cache("k_cache", k_cache, kv_format, dev)
    nb, bs, Hkv, Dk = k_cache.shape
    if Dk != D:
        raise ValueError(f"k_cache: head_dim {Dk} differs from q's {D}")
    check_kv_cache("v_cache", v_cache, kv_format, dev)
    check_tensor("v_cache", v_cache, shape=(nb, bs, Hkv, D))
    if Hq % Hkv:
        raise ValueError(f"q: num_heads ({Hq}) must be a multiple of num_kv_heads ({Hkv})")
    check_tensor("block_table", block_table, dtype=torch.int32, ndim=2, device=dev)
    S = block_table.shape[0]
    check_tensor("seq_lens", seq_lens, dtype=torch.int32, shape=(S,), device=dev)
    check_tensor("cu_seqlens_q", cu_seqlens_q, dtype=torch.int32, shape=(S + 1,), device=dev)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) or not (
        math.isfinite(softmax_scale) and softmax_scale > 0
    ):
        raise ValueError(f"softmax_scale: must be a finite number > 0, got {softmax_scale!r}")
    if sliding_window is not None:
        check_positive_int("sliding_window", sliding_window)
    qd = check_descale("q_descale", q_descale, S, Hkv, dev)
    kd = check_descale("k_descale", k_descale, S, Hkv, dev)
    vd = check_descale("v_descale", v_descale, S, Hkv, dev)
    dynamic = ref.is_dynamic(kv_format)
    check_scale_caches(kv_format, dynamic, k_scale_cache, v_scale_cache, k_cache)
    if out is not None:
        check_tensor("out", out, dtype=torch.bfloat16, shape=(T, Hq, D), device=dev)
        if out.stride(-1) != 1:
            raise ValueError("out: the last dim must be contiguous")
    if num_kv_splits is not None:
        check_positive_int("num_kv_splits", num_kv_splits)
        if num_kv_splits > MAX_KV_SPLITS:
            raise ValueError(f"num_kv_splits: at most {MAX_KV_SPLITS}, got {num_kv_splits}")
    if stage_kv is not None and not isinstance(stage_kv, bool):
        raise TypeError(f"stage_kv: must be True, False or None, got {stage_kv!r}")
    check_same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                      cu_seqlens_q=cu_seqlens_q)
    if check_indices:
        _check_lengths(seq_lens, cu_seqlens_q, T, block_table.shape[1] * bs)
        check_block_table(block_table, seq_lens, nb, bs)
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if S else 0
    else:
        check_positive_int("max_seqlen_q", max_seqlen_q, allow_zero=True)

    if out is None:
        out = torch.empty(T, Hq, D, dtype=torch.bfloat16, device=dev)
    if T == 0:
        return out
    if not use_triton(dev, impl):
        out.copy_(ref.paged_attention(q, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, kv_format,
                                      float(softmax_scale), causal, q_descale, k_descale, v_descale,
                                      k_scale_cache, v_scale_cache, sliding_window))
        return out
    if max_seqlen_q == 0:
        return out.zero_()

    from fp4comm.kernels import attention as _k

    if tiles is not None:
        if tiles.block_m < max(16, tiles.group_pad) or tiles.group_pad < Hq // Hkv:
            raise ValueError(f"tiles: block_m >= 16 and group_pad >= {Hq // Hkv} needed, got {tiles}")
        if tiles.kernel not in PREFILL_KERNELS:
            raise ValueError(f"tiles.kernel: must be one of {list(PREFILL_KERNELS)}, got {tiles.kernel!r}")
    tiles, staged = launch_tiles(tiles, num_kv_splits, stage_kv, kv_format, bs, block_table.shape[1], T, S, Hq, Hkv,
                                 D, max_seqlen_q, causal, sliding_window)
    if staged:
        k_cache, v_cache, block_table = stage_kv_pages(k_cache, v_cache, block_table)
        bs = STAGE_PAGE
    fa = runs_fa(tiles, num_kv_splits)
    num_q_tiles = cdiv(max_seqlen_q, tiles.block_q)
    exact = triton_interpreting() and dev.type == "cpu"
    cvt = effective_convert_mode(tiles.kv_convert, kv_format, exact)
    ksc = k_scale_cache if dynamic else dummy(dev).view(1, 1, 1)
    vsc = v_scale_cache if dynamic else dummy(dev).view(1, 1, 1)
    strides = _kernel_strides(q, k_cache, v_cache, ksc, vsc, block_table, qd, kd, vd, out)
    scale_log2 = float(softmax_scale) * math.log2(math.e)
    bt_ldg = tiles.bt_ldg and block_table.shape[1] > 0  # its reads may touch column 0 of any row
    common = dict(HEAD_DIM=D, GROUP_PAD=tiles.group_pad, BLOCK_Q=tiles.block_q, BLOCK_N=tiles.block_n,
                  DYNAMIC=dynamic, CAUSAL=bool(causal), USE_WINDOW=sliding_window is not None,
                  PAGE=bs if bs & (bs - 1) == 0 else 0, CVT=cvt, INTERPRET=exact,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)  # fmt: skip
    if fa:
        from fp4comm.kernels import attention_prefill as _kp

        descs = fa_tensor_descriptors(k_cache, v_cache, common["PAGE"], tiles.block_n) if tiles.fa_tma else None
        # one program per (q tile, sequence, KV head), longest q tiles first
        _kp.paged_prefill_kernel[(num_q_tiles * S * Hkv,)](
            q, k_cache, v_cache, out, block_table, seq_lens, cu_seqlens_q, qd[0], kd[0], vd[0], ksc, vsc,
            scale_log2, Hq // Hkv, bs, sliding_window or 0, S, Hkv, num_q_tiles, *strides,
            Q_SMEM=tiles.fa_q_smem and q.dtype == torch.bfloat16 and cvt < 3, BT_LDG=bt_ldg,
            TMA=descs is not None, k_desc=descs and descs[0], v_desc=descs and descs[1],
            BT_VEC=bt_ldg and _block_table_vector_reads(block_table, common["PAGE"], tiles.block_n), **common,
        )  # fmt: skip
        return out
    max_k = block_table.shape[1] * bs
    kw = dict(BT_LDG=bt_ldg, **common)

    def launch(splits: int, warmup: bool = False):
        """The decode kernel over ``splits`` splits (its workspace allocated here), or with
        ``warmup`` the compiled split kernel only (nothing runs)."""
        if splits > 1:
            ws_o = torch.empty(splits, T, Hq, D, dtype=torch.float32, device=dev)
            ws_lse = torch.empty(splits, T, Hq, dtype=torch.float32, device=dev)
        else:
            ws_o, ws_lse = dummy(dev).view(1, 1, 1, 1), dummy(dev).view(1, 1, 1)
        fuse = tiles.fuse_combine and 1 < splits <= FUSE_COMBINE_MAX_SPLITS
        # fused combine: one arrival counter a (sequence, q tile, KV head), zero before the launch
        counters = (torch.empty if warmup else torch.zeros)(S * num_q_tiles * Hkv, dtype=torch.int32, device=dev) \
            if fuse else None
        grid = (S * num_q_tiles, Hkv, splits)
        args = (q, k_cache, v_cache, out, ws_o, ws_lse, block_table, seq_lens, cu_seqlens_q, qd[0], kd[0], vd[0],
                ksc, vsc, scale_log2, Hq // Hkv, bs, sliding_window or 0, num_q_tiles, *strides,
                ws_o.stride(0), ws_o.stride(1), ws_o.stride(2), ws_lse.stride(0), ws_lse.stride(1))
        opts = dict(kw, NUM_SPLITS=splits, FUSE_COMBINE=fuse, counter_ptr=counters)
        if warmup:
            return _k.paged_attention_kernel.warmup(*args, grid=grid, **opts)
        _k.paged_attention_kernel[grid](*args, **opts)
        if splits > 1 and not fuse:
            combine_splits(ws_o, ws_lse, out, exact)

    splits = num_kv_splits
    if splits is None and ref.base_format(kv_format) in WAVE_SPLIT_FORMATS:
        splits = 1  # fill whole waves of the split kernel's resident programs
        if max_k >= 2 * MIN_KEYS_PER_SPLIT:
            key = (q.dtype, k_cache.dtype, out.dtype, tiles.fuse_combine, tuple(sorted(kw.items())))
            resident = _resident(dev, key, launch)
            splits = splits_for_slots(S * num_q_tiles * Hkv, max_k, _num_sms(dev) * resident)
    elif splits is None:
        splits = select_num_kv_splits(S * num_q_tiles * Hkv, max_k, _num_sms(dev))
    launch(splits)
    return out


def _resident(dev: torch.device, key: tuple, launch) -> int:
    """Resident programs an SM of the split decode kernel (``launch(2, warmup=True)``
    compiles its 2-split build; counted once per device and configuration ``key``, and taken
    for every split count: the builds differ by a few registers, e.g. one-warp fp8 161 at
    2-5 splits, 168 at 6, 159 at 8 and 16, all 12 an SM); :data:`INTERPRETER_RESIDENT` off
    the GPU."""
    if dev.type != "cuda":
        return INTERPRETER_RESIDENT
    key = (dev.index, *key)
    n = _RESIDENT.get(key)
    if n is None:
        ck = launch(2, warmup=True)
        ck = ck.result() if hasattr(ck, "result") else ck
        ck._init_handles()
        n = _RESIDENT[key] = resident_programs(ck, dev)
    return n


def _kernel_strides(q, k_cache, v_cache, ksc, vsc, block_table, qd, kd, vd, out) -> tuple:
    """The stride arguments both attention kernels take after their scalars, in their order
    (``qd / kd / vd``: :func:`check_descale` triples)."""
    return (q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3], *ksc.stride()[:3],
            *vsc.stride()[:3], block_table.stride(0), qd[1], qd[2], kd[1], kd[2], vd[1], vd[2],
            out.stride(0), out.stride(1))  # fmt: skip


def combine_splits(ws_o: torch.Tensor, ws_lse: torch.Tensor, out: torch.Tensor, exact: bool) -> None:
    """Merge ``ws_o [splits, T, H, D]`` / ``ws_lse [splits, T, H]`` (base 2) into ``out [T, H, D]``."""
    from fp4comm.kernels import attention as _k

    splits, T, H, D = ws_o.shape
    _k.combine_splits_kernel[(T, H)](
        ws_o, ws_lse, out, splits,
        ws_o.stride(0), ws_o.stride(1), ws_o.stride(2), ws_lse.stride(0), ws_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, SPLITS_PAD=next_pow2(splits), INTERPRET=exact, num_warps=4 if D >= 256 else 2,
    )


def _check_lengths(seq_lens: torch.Tensor, cu: torch.Tensor, T: int, max_len: int) -> None:
    if seq_lens.numel() and int(seq_lens.min()) < 0:
        raise ValueError("seq_lens: entries must be >= 0")
    if seq_lens.numel() and int(seq_lens.max()) > max_len:
        raise ValueError(
            f"seq_lens: max {int(seq_lens.max())} exceeds the block table's capacity "
            f"(max_blocks * block_size = {max_len})"
        )
    if int(cu[0]) != 0 or int(cu[-1]) != T:
        raise ValueError(f"cu_seqlens_q: must start at 0 and end at T = {T}, got {int(cu[0])} .. {int(cu[-1])}")
    if cu.numel() > 1 and bool((cu[1:] < cu[:-1]).any()):
        raise ValueError("cu_seqlens_q: must be non-decreasing")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small grids keep the CPU tests fast
