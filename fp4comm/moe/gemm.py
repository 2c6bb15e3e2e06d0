"""Masked grouped GEMM over the dispatch layout, and expert-weight quantizers.

``grouped_gemm_masked(a, b, masked_m)`` computes, for every local expert ``e``,
``out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T`` where ``a`` is what
``EPBuffer.dispatch`` returns (the masked layout ``[E, max_m, K]``) and ``b`` holds the
expert weights ``[E, N, K]`` (``nn.Linear`` convention: ``y = x @ w.T``).

Operand formats:

==========  ===============================================  ================================================
format      ``a`` (activations ``[E, max_m, K]``)           ``b`` (weights ``[E, N, K]``)
==========  ===============================================  ================================================
bf16        ``torch.bfloat16`` tensor                        ``torch.bfloat16`` tensor
fp8         ``FP8BlockTensor``: E4M3 ``[E, max_m, K]``,      ``FP8BlockTensor``: E4M3 ``[E, N, K]``, FP32
            FP32 scales ``[E, max_m, K/128]`` (1x128)        scales ``[E, ceil(N/128), K/128]`` (128x128)
nvfp4       ``NVFP4Tensor`` ``[E, max_m, K]``, scales        ``NVFP4Tensor`` ``[E, N, K]``, scales linear or
            linear or swizzled, ``global_scale`` ``[]``      swizzled, ``global_scale`` ``[]``, ``[E]``
            or ``[E, max_m]``                                 (per expert) or ``[E, N]``
==========  ===============================================  ================================================

Contract: rows at or past ``masked_m[e]`` of ``a`` are not read and of ``out`` not
written (a fresh ``out`` holds garbage there); an expert with ``masked_m[e] == 0`` reads
none of its weights. ``masked_m`` is ``int32 [E]`` on the operands' device.

``masked_m > max_m``: when ``masked_m`` lives on the CPU it is checked on the host
(``ValueError``). On a GPU a check would cost a device sync on every call (the value is
produced on device by dispatch), so by default the kernel clamps ``masked_m[e]`` to
``max_m`` (no out-of-bounds access, ever) and ``check_masked_m=True`` adds the synced
check for debugging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from .._checks import check_choice, check_same_device, check_tensor
from .._runtime import cdiv, triton_interpreting, use_triton
from ..formats import FP8_BLOCK, NVFP4_BLOCK, FP8BlockTensor, NVFP4Tensor, swizzled_shape
from ..reference import moe as _ref

__all__ = [
    "GemmConfig",
    "grouped_gemm_masked",
    "dequantize_masked",
    "quantize_weights",
    "dequantize_weights",
    "operand_format",
]

OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_FMT_CODE = {"bf16": 0, "fp8": 1, "nvfp4": 2}


# ----------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class GemmConfig:
    """Tile configuration of the grouped GEMM kernel.

    ``loop_m``: one program walks every m tile of its (expert, n tile) instead of owning
    one; used when rows per expert are few (decode), so the grid has no m dimension.
    """

    block_m: int
    block_n: int
    block_k: int
    loop_m: bool
    num_warps: int = 4
    num_stages: int = 3

    def meta(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "LOOP_M": self.loop_m}


def m_bucket(m: int) -> int:
    """Autotune bucket of the rows per expert: 16 (decode), 64 (small batches), 128+ (prefill)."""
    if m <= 16:
        return 16
    if m <= 64:
        return 64
    return 128 if m <= 256 else 512


def _select_config(m_hint: int, N: int, K: int, a_fmt: str, b_fmt: str, *, interpreter: bool) -> GemmConfig:
    """The tile config used under the interpreter, and on GPU with ``config="heuristic"``
    (autotuning, the GPU default, searches :func:`_autotune_configs` instead).

    Reasons:
      * ``tl.dot`` needs every tile dim >= 16 and Triton needs powers of two.
      * FP8 block scales are applied per K step, so ``block_k`` must divide 128.
      * Decode (<= 16 rows an expert): ``block_m = 16`` wastes the fewest MMA rows;
        ``loop_m`` so no program is launched for m tiles that are almost always empty.
        The kernel is then weight-bandwidth bound: ``block_n = 64`` gives
        ``N/64 * active experts`` programs (enough to fill 132 SMs with a handful of
        experts) and ``block_k = 128`` keeps >= 16 KiB of weights in flight per stage.
      * Prefill: ``128 x 256 x 64``, 8 warps, 3 stages. A quantized A tile is decoded in
        registers once per K step and shared by ``block_n`` columns, so the decode cost per
        FLOP falls as ``1 / block_n``: 256 halves it against the standard 128 (A decode was
        the measured 2x at 128). Shared memory per stage: B 32 KiB + A 4 KiB (NVFP4) to
        16 KiB (BF16), so 3 stages fit in 227 KiB with the layout-conversion scratch.
        The accumulator is 128 FP32 registers a thread at 8 warps.
      * Interpreter: each tile op costs ~1 ms of Python whatever its size, so few, large
        tiles (<= 128 columns, K step up to 256, 128 with fp8) and ``loop_m``; rows stay
        16-32 because row tiles past ``masked_m`` are skipped anyway.
    """
    fp8 = "fp8" in (a_fmt, b_fmt)
    if interpreter:
        bm = 16 if m_hint <= 16 else 32
        bn = min(128, max(16, triton.next_power_of_2(N)))
        bk = min(128 if fp8 else 256, max(32, triton.next_power_of_2(K)))
        return GemmConfig(bm, bn, bk, True, 4, 1)
    if m_hint <= 16:
        return GemmConfig(16, 64, 128, True, 4, 4)
    if m_hint <= 64:
        return GemmConfig(64, 128, 64, False, 4, 4)
    return GemmConfig(128, 256, 64, False, 8, 3)


#: (block_n, block_k, num_warps, num_stages) candidates per rows-per-expert bucket, by block_m
_DECODE_TILES = ((32, 128, 4, 6), (64, 128, 4, 4), (64, 256, 4, 4), (128, 128, 4, 4), (128, 128, 8, 3),
                 (64, 128, 4, 6))  # fmt: skip
_SMALL_TILES = ((64, 128, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3), (256, 64, 8, 3))
_PREFILL_TILES = {  # block_m -> tiles; block_n 256 amortizes the A decode over twice the columns
    128: ((256, 64, 8, 3), (256, 64, 8, 4), (256, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 3), (128, 64, 4, 5)),
    64: ((256, 64, 4, 4), (256, 128, 8, 3), (128, 64, 4, 5), (256, 64, 8, 5)),
}
#: usable shared memory a block on sm_90 (227 KiB), less scratch for the A layout conversion
_SMEM_BUDGET = 227 * 1024 - 16 * 1024


def _autotune_configs() -> list[triton.Config]:
    """Candidate configs of every bucket; :func:`_prune_configs` keeps one bucket's per call."""
    out = []

    def add(bm, bn, bk, loop, w, s):
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "LOOP_M": loop}, num_warps=w, num_stages=s))

    for bn, bk, w, s in _DECODE_TILES:  # decode: weight streaming
        add(16, bn, bk, True, w, s)
    for bn, bk, w, s in _SMALL_TILES:  # small batches
        add(64, bn, bk, False, w, s)
    for bm, tiles in _PREFILL_TILES.items():  # prefill
        for bn, bk, w, s in tiles:
            add(bm, bn, bk, False, w, s)
    return out


_OPERAND_BYTES = {0: 2.0, 1: 1.0, 2: 0.5 + 1 / 16}  # bytes per element in shared memory (bf16, fp8, nvfp4)


def _stage_bytes(kw: dict, a_fmt: int, b_fmt: int) -> float:
    """Shared memory of one pipeline stage: the A and B tiles as loaded."""
    return (kw["BLOCK_M"] * _OPERAND_BYTES[a_fmt] + kw["BLOCK_N"] * _OPERAND_BYTES[b_fmt]) * kw["BLOCK_K"]


def _bucket_tiles(bucket: int) -> set[tuple]:
    """``(block_m, block_n, block_k, loop_m, num_warps, num_stages)`` candidates of a bucket:
    the decode tiles (<= 16 rows an expert), the small-batch tiles (17-64), the block_m 128
    prefill tiles (65-256) and, from 257 rows, the block_m 64 prefill tiles as well."""
    if bucket <= 16:
        return {(16, *t[:2], True, *t[2:]) for t in _DECODE_TILES}
    if bucket <= 64:
        return {(64, *t[:2], False, *t[2:]) for t in _SMALL_TILES}
    bms = (128, 64) if bucket > 256 else (128,)
    return {(bm, *t[:2], False, *t[2:]) for bm in bms for t in _PREFILL_TILES[bm]}


def _bucket_configs(configs, bucket: int, a_fmt: int, b_fmt: int) -> list:
    """The configs of one bucket that are legal (FP8: ``block_k`` divides 128) and whose
    pipeline stages fit in shared memory (the rest would fail to launch)."""
    fp8 = 1 in (a_fmt, b_fmt)
    tiles = _bucket_tiles(bucket)
    keep = []
    for c in configs:
        kw = c.kwargs
        key = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["LOOP_M"], c.num_warps, c.num_stages)
        if key not in tiles or (fp8 and 128 % kw["BLOCK_K"]):
            continue
        if c.num_stages * _stage_bytes(kw, a_fmt, b_fmt) > _SMEM_BUDGET:
            continue
        keep.append(c)
    return keep


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    keep = _bucket_configs(configs, args["M_BUCKET"], args["A_FMT"], args["B_FMT"])
    return keep or [configs[0]]


_autotuned_kernel = None


def _gpu_codegen(device: torch.device) -> bool:
    """True when the kernel is compiled for a GPU (not run by the interpreter): selects the
    inline-PTX decode, FP8 dots and autotuning."""
    return device.type == "cuda" and not triton_interpreting()


def _m_iters(max_m: int, block_m: int, loop_m: bool) -> int:
    """m tiles one program visits (a compile-time trip count; rounded up to a power of two
    with ``loop_m`` so a changing ``max_m`` recompiles rarely)."""
    return triton.next_power_of_2(cdiv(max_m, block_m)) if loop_m else 1


def _get_autotuned():
    global _autotuned_kernel
    if _autotuned_kernel is None:
        from ..kernels.gemm import grouped_gemm_masked_kernel

        _autotuned_kernel = triton.autotune(
            configs=_autotune_configs(),
            key=["N", "K", "M_BUCKET", "A_FMT", "A_SWIZZLED", "A_GS_MODE", "B_FMT", "B_SWIZZLED", "B_GS_MODE", "A_POW2"],
            prune_configs_by={"early_config_prune": _prune_configs},
        )(triton.heuristics({"M_ITERS": lambda a: _m_iters(a["MAX_M"], a["BLOCK_M"], a["LOOP_M"])})(grouped_gemm_masked_kernel))
    return _autotuned_kernel


# ----------------------------------------------------------------------------- validation
def operand_format(t: object) -> str:
    """``"bf16"``, ``"fp8"`` or ``"nvfp4"`` for a GEMM operand."""
    if isinstance(t, NVFP4Tensor):
        return "nvfp4"
    if isinstance(t, FP8BlockTensor):
        return "fp8"
    if isinstance(t, torch.Tensor):
        return "bf16"
    raise TypeError(f"expected a torch.Tensor, FP8BlockTensor or NVFP4Tensor, got {type(t).__name__}")


@dataclass
class _Operand:
    fmt: str
    data: torch.Tensor
    sf: torch.Tensor | None
    gs: torch.Tensor | None
    swizzled: bool
    gs_mode: int  # 0 static, 1 per expert, 2 per row
    ksf: int
    mt: int
    kt: int
    pow2: bool = False  # fp8 with power-of-two (UE8M0) scales


def _check_masked_m_range(masked_m: torch.Tensor, max_m: int) -> None:
    """Host check ``0 <= masked_m <= max_m`` (a device sync when ``masked_m`` is on a GPU)."""
    mm = masked_m.cpu()
    if mm.numel() and (int(mm.max()) > max_m or int(mm.min()) < 0):
        raise ValueError(f"masked_m: values must lie in [0, max_m={max_m}], got min {int(mm.min())}, max {int(mm.max())}")


def _check_operand(name: str, t, rows_name: str, is_weight: bool) -> tuple[_Operand, int, int, int]:
    """Validate ``a`` or ``b``; returns (operand, E, rows, K)."""
    fmt = operand_format(t) if isinstance(t, (torch.Tensor, FP8BlockTensor, NVFP4Tensor)) else None
    if fmt is None:
        raise TypeError(f"{name}: expected a torch.Tensor, FP8BlockTensor or NVFP4Tensor, got {type(t).__name__}")
    if fmt == "bf16":
        check_tensor(name, t, dtype=torch.bfloat16, ndim=3, contiguous=True)
        E, R, K = t.shape
        return _Operand("bf16", t, None, None, False, 0, 1, 1, 1), E, R, K
    if fmt == "fp8":
        check_tensor(f"{name}.data", t.data, dtype=torch.float8_e4m3fn, ndim=3, contiguous=True)
        E, R, K = t.data.shape
        if t.block != FP8_BLOCK:
            raise ValueError(f"{name}.block: the GEMM supports FP8 blocks of {FP8_BLOCK}, got {t.block}")
        if K % FP8_BLOCK:
            raise ValueError(f"{name}: K must be a multiple of {FP8_BLOCK} for fp8, got K={K}")
        srows = cdiv(R, FP8_BLOCK) if is_weight else R
        what = "128x128 block" if is_weight else "1x128"
        if tuple(t.scales.shape) != (E, srows, K // FP8_BLOCK):
            raise ValueError(
                f"{name}.scales: expected [{E}, {srows}, {K // FP8_BLOCK}] ({what} scales), got {list(t.scales.shape)}"
            )
        check_tensor(f"{name}.scales", t.scales, dtype=torch.float32, contiguous=True)
        return _Operand("fp8", t.data, t.scales, None, False, 0, K // FP8_BLOCK, srows, 1, bool(t.ue8m0)), E, R, K
    # nvfp4
    if len(t.shape) != 3:
        raise ValueError(f"{name}: expected a 3-dim NVFP4Tensor [E, {rows_name}, K], got shape {list(t.shape)}")
    E, R, K = t.shape
    if K % NVFP4_BLOCK:
        raise ValueError(f"{name}: K must be a multiple of {NVFP4_BLOCK} for nvfp4, got K={K}")
    check_tensor(f"{name}.data", t.data, dtype=torch.uint8, shape=[E, R, K // 2], contiguous=True)
    ksf = K // NVFP4_BLOCK
    check_tensor(f"{name}.scales", t.scales, dtype=(torch.float8_e4m3fn, torch.uint8), contiguous=True)
    check_choice(f"{name}.scale_layout", t.scale_layout, ("linear", "swizzled"))
    swz = t.scale_layout == "swizzled"
    if swz:
        Mp, Kp = swizzled_shape(R, ksf)
        check_tensor(f"{name}.scales", t.scales, shape=[E, Mp, Kp])
    else:
        check_tensor(f"{name}.scales", t.scales, shape=[E, R, ksf])
    gs = t.global_scale
    check_tensor(f"{name}.global_scale", gs, dtype=torch.float32)
    if gs.dim() == 0:
        mode = 0
    elif tuple(gs.shape) == (E, R):
        mode = 2
    elif is_weight and tuple(gs.shape) == (E,):
        mode = 1
    else:
        allowed = f"[], [{E}] or [{E}, {R}]" if is_weight else f"[] or [{E}, {R}]"
        raise ValueError(f"{name}.global_scale: expected shape {allowed}, got {list(gs.shape)}")
    op = _Operand("nvfp4", t.data, t.scales.view(torch.uint8), gs.contiguous(), swz, mode, ksf, cdiv(R, 128), cdiv(ksf, 4))
    return op, E, R, K


def grouped_gemm_masked(
    a: torch.Tensor | FP8BlockTensor | NVFP4Tensor,
    b: torch.Tensor | FP8BlockTensor | NVFP4Tensor,
    masked_m: torch.Tensor,
    *,
    out_dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
    expected_m: int | None = None,
    config: GemmConfig | str = "auto",
    check_masked_m: bool = False,
    a_path: str = "auto",
    impl: str = "auto",
) -> torch.Tensor:
    """Masked grouped GEMM ``out[e, :masked_m[e]] = a[e, :masked_m[e]] @ b[e].T``.

    Args:
        a: activations ``[E, max_m, K]``: BF16 tensor, ``FP8BlockTensor`` (1x128 scales) or
            ``NVFP4Tensor`` (linear or swizzled scales, static or per-row global scale).
        b: weights ``[E, N, K]``: BF16 tensor, ``FP8BlockTensor`` (128x128 scales
            ``[E, ceil(N/128), K/128]``) or ``NVFP4Tensor`` (global scale ``[]``, ``[E]`` or ``[E, N]``).
        masked_m: ``[E]`` ``torch.int32`` rows of each expert, on the operands' device.
        out_dtype: dtype of a freshly allocated ``out`` (``bfloat16``, ``float16``, ``float32``).
        out: optional ``[E, max_m, N]`` contiguous output; rows past ``masked_m`` keep their contents.
        expected_m: typical rows per expert (picks the tile config; default ``max_m``), as
            DeepGEMM's masked GEMM takes it -- the real counts live on the device.
        config: ``"auto"`` (autotune on GPU, :func:`_select_config` under the interpreter),
            ``"heuristic"`` (:func:`_select_config`) or a :class:`GemmConfig`.
        check_masked_m: on GPU, also check ``masked_m <= max_m`` (one device sync).
        a_path: how FP8 / NVFP4 activations reach the tensor cores: ``"registers"`` (the
            tiles are dequantized in registers inside the GEMM), ``"bf16"`` (two passes:
            :func:`dequantize_masked` writes BF16 rows ``< masked_m``, then the BF16 GEMM; costs
            an ``[E, max_m, K]`` BF16 temporary), or ``"auto"``: ``"bf16"`` on a GPU when the
            typical rows per expert (``expected_m``, else ``max_m``) are at least
            :data:`TWO_PASS_MIN_M` (prefill: the GEMM is compute-bound and the BF16 main loop
            is faster than dequantizing in it), else ``"registers"`` (decode: weight-bound).
            Results agree to BF16 rounding of the dequantized activations.
        impl: ``"auto"``, ``"triton"`` or ``"reference"``.

    Returns:
        ``out`` ``[E, max_m, N]``.
    """
    A, E, max_m, K = _check_operand("a", a, "max_m", is_weight=False)
    B, Eb, N, Kb = _check_operand("b", b, "N", is_weight=True)
    if Eb != E:
        raise ValueError(f"b: has {Eb} experts but a has {E}")
    if Kb != K:
        raise ValueError(f"b: K mismatch: a has K={K}, b has K={Kb} (b is [E, N, K], used as b[e].T)")
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=[E])
    tensors = {"a": A.data, "b": B.data, "masked_m": masked_m}
    for nm, op in (("a", A), ("b", B)):
        if op.sf is not None:
            tensors[f"{nm}.scales"] = op.sf
        if op.gs is not None:
            tensors[f"{nm}.global_scale"] = op.gs
    if out is not None:
        tensors["out"] = out
    device = check_same_device(**tensors)
    if out is not None:
        check_tensor("out", out, dtype=OUT_DTYPES, shape=[E, max_m, N], contiguous=True)
    elif out_dtype not in OUT_DTYPES:
        raise TypeError(f"out_dtype: must be one of bfloat16, float16, float32, got {out_dtype}")
    if masked_m.device.type == "cpu" or check_masked_m:
        _check_masked_m_range(masked_m, max_m)
    if out is None:
        out = torch.empty(E, max_m, N, dtype=out_dtype, device=device)
    if E == 0 or max_m == 0 or N == 0:
        return out
    check_choice("a_path", a_path, ("auto", "registers", "bf16"))
    if not use_triton(device, impl):
        return _ref.grouped_gemm_masked_ref(a, b, masked_m, out=out)
    if K == 0:
        raise ValueError("a: K must be > 0")

    m_hint = max_m if expected_m is None else max(1, min(int(expected_m), max_m))
    if A.fmt != "bf16" and (a_path == "bf16" or (a_path == "auto" and _gpu_codegen(device) and m_hint >= TWO_PASS_MIN_M)):
        # two passes: the operands are validated already, so launch the dequantization and go on
        # with the BF16 copy as ``a``
        a16 = torch.empty(E, max_m, K, dtype=torch.bfloat16, device=device)
        _launch_masked_dequant(A, masked_m, a16, E, max_m, K, device)
        A = _Operand("bf16", a16, None, None, False, 0, 1, 1, 1)
    dummy = torch.empty(1, dtype=torch.float32, device=device)
    args = dict(
        a_ptr=A.data,
        a_sf_ptr=A.sf if A.sf is not None else dummy,
        a_gs_ptr=A.gs if A.gs is not None else dummy,
        b_ptr=B.data,
        b_sf_ptr=B.sf if B.sf is not None else dummy,
        b_gs_ptr=B.gs if B.gs is not None else dummy,
        c_ptr=out,
        masked_m_ptr=masked_m,
        N=N,
        K=K,
        MAX_M=max_m,
        A_KSF=A.ksf,
        A_MT=A.mt,
        A_KT=A.kt,
        B_KSF=B.ksf,
        B_MT=B.mt,
        B_KT=B.kt,
        M_BUCKET=m_bucket(m_hint),
        A_FMT=_FMT_CODE[A.fmt],
        A_SWIZZLED=A.swizzled,
        A_GS_MODE=A.gs_mode,
        B_FMT=_FMT_CODE[B.fmt],
        B_SWIZZLED=B.swizzled,
        B_GS_MODE=B.gs_mode,
        A_POW2=A.pow2,
    )

    def grid(meta):
        m_programs = 1 if meta["LOOP_M"] else cdiv(max_m, meta["BLOCK_M"])
        return (m_programs * cdiv(N, meta["BLOCK_N"]), E)

    gpu = _gpu_codegen(device)
    if config == "auto" and gpu:
        _get_autotuned()[grid](**args)
        return out
    if isinstance(config, str):
        check_choice("config", config, ("auto", "heuristic"))
        config = _select_config(m_hint, N, K, A.fmt, B.fmt, interpreter=not gpu)
    elif not isinstance(config, GemmConfig):
        raise TypeError(f"config: expected 'auto', 'heuristic' or a GemmConfig, got {type(config).__name__}")
    if "fp8" in (A.fmt, B.fmt) and 128 % config.block_k:
        raise ValueError(f"config: block_k must divide 128 with fp8 operands, got {config.block_k}")
    from ..kernels.gemm import grouped_gemm_masked_kernel

    grouped_gemm_masked_kernel[grid](
        **args,
        **config.meta(),
        M_ITERS=_m_iters(max_m, config.block_m, config.loop_m),
        DOT_F32=not gpu,
        SOFT_DECODE=not gpu,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


#: ``a_path="auto"`` takes the two-pass (BF16) route from this many typical rows per expert
TWO_PASS_MIN_M = 64


def dequantize_masked(
    a: FP8BlockTensor | NVFP4Tensor, masked_m: torch.Tensor, *, out: torch.Tensor | None = None, impl: str = "auto"
) -> torch.Tensor:
    """BF16 copy of the rows ``< masked_m[e]`` of a masked activation operand.

    Args:
        a: ``NVFP4Tensor`` ``[E, max_m, K]`` (linear or swizzled scales, global scale ``[]``,
            ``[E]`` or ``[E, max_m]``) or ``FP8BlockTensor`` (1x128 scales), e.g. the
            dispatch output.
        masked_m: ``[E]`` int32 valid rows per expert (clamped to ``max_m`` on GPU, checked on CPU).
        out: optional ``[E, max_m, K]`` BF16 contiguous output; rows ``>= masked_m[e]`` are not
            written (a fresh ``out`` holds garbage there, which no masked GEMM reads).

    Returns ``out``. Rounding: ``fp4comm.reference.moe.dequantize_masked_ref`` bit for bit.
    One memory-bound pass (reads 4.5 / 8.25 bits, writes 16 bits per value).
    """
    if isinstance(a, torch.Tensor):
        raise TypeError("a: expected an NVFP4Tensor or FP8BlockTensor (a BF16 tensor needs no dequantization)")
    A, E, max_m, K = _check_operand("a", a, "max_m", is_weight=False)
    check_tensor("masked_m", masked_m, dtype=torch.int32, shape=[E])
    tensors = {"a": A.data, "masked_m": masked_m, "a.scales": A.sf}
    if A.gs is not None:
        tensors["a.global_scale"] = A.gs
    if out is not None:
        tensors["out"] = out
    device = check_same_device(**tensors)
    if out is None:
        out = torch.empty(E, max_m, K, dtype=torch.bfloat16, device=device)
    else:
        check_tensor("out", out, dtype=torch.bfloat16, shape=[E, max_m, K], contiguous=True)
    if masked_m.device.type == "cpu":
        _check_masked_m_range(masked_m, max_m)
    if E == 0 or max_m == 0 or K == 0:
        return out
    if not use_triton(device, impl):
        ref = _ref.dequantize_masked_ref(a, masked_m)
        for e in range(E):
            m = min(int(masked_m[e]), max_m)
            out[e, :m] = ref[e, :m]
        return out
    _launch_masked_dequant(A, masked_m, out, E, max_m, K, device)
    return out


def _launch_masked_dequant(A: _Operand, masked_m, out, E: int, max_m: int, K: int, device) -> None:
    """The dequantization kernel of a validated NVFP4 / FP8 operand into ``out``."""
    from ..kernels.masked import fp8_masked_dequant_kernel, nvfp4_masked_dequant_kernel

    if A.fmt == "nvfp4":
        rows, bw = 4, 128
        kw = K // 8
        nvfp4_masked_dequant_kernel[(cdiv(max_m, rows), cdiv(kw, bw), E)](
            A.data.view(torch.int32), A.sf, A.gs, masked_m, out, max_m, kw, A.ksf, A.mt, A.kt,
            GS_MODE=A.gs_mode, SWIZZLE=A.swizzled, ROWS=rows, BW=bw, num_warps=4,
        )  # fmt: skip
    else:
        rows, bk = 4, 1024
        fp8_masked_dequant_kernel[(cdiv(max_m, rows), cdiv(K, bk), E)](
            A.data.view(torch.uint8), A.sf, masked_m, out, max_m, K,
            HW_CVT=_gpu_codegen(device), ROWS=rows, BK=bk, num_warps=4,
        )  # fmt: skip


# ----------------------------------------------------------------------------- weights
def quantize_weights(w: torch.Tensor, fmt: str, *, scale_layout: str = "linear"):
    """Expert weights ``w [E, N, K]`` (any float dtype) -> the GEMM's ``b`` operand in ``fmt``.

    ``"bf16"``: ``w.to(bfloat16)``; ``"fp8"``: E4M3 with 128x128 FP32 block scales
    (``K`` a multiple of 128); ``"nvfp4"``: NVFP4 with one global scale per expert
    (``K`` a multiple of 16). Offline, plain torch (see ``fp4comm.reference.moe``).
    """
    check_tensor("w", w, dtype=(torch.bfloat16, torch.float16, torch.float32), ndim=3)
    check_choice("fmt", fmt, _ref.WEIGHT_FORMATS)
    K = w.shape[-1]
    if fmt == "bf16":
        return w.to(torch.bfloat16).contiguous()
    if fmt == "fp8":
        if K % FP8_BLOCK:
            raise ValueError(f"w: K must be a multiple of {FP8_BLOCK} for fp8 weights, got {K}")
        return _ref.quantize_weight_fp8_ref(w)
    if K % NVFP4_BLOCK:
        raise ValueError(f"w: K must be a multiple of {NVFP4_BLOCK} for nvfp4 weights, got {K}")
    check_choice("scale_layout", scale_layout, ("linear", "swizzled"))
    return _ref.quantize_weight_nvfp4_ref(w.contiguous(), scale_layout=scale_layout)


def dequantize_weights(b) -> torch.Tensor:
    """FP32 ``[E, N, K]`` values of a weight operand in any format."""
    return _ref.dequantize_any_ref(b, weight=True)
