"""Compile every EP kernel variant for sm_90 (Hopper) without a GPU (see tests/sm90.py): the
interpreter accepts code the GPU compiler rejects (constexpr scoping, pointer casts,
loop-carried types). Also checks the combine kernels contain no FMA (bit-exactness with the
torch reference)."""

from tests.sm90 import compile_calls


def test_ep_kernels_compile_for_sm90():
    names = compile_calls(
        """
        import fp4comm.ep.buffer as B
        from fp4comm.ep.message import MessageLayout
        force_triton(B)
        import fp4comm.ep.layout as L
        force_triton(L)
        from fp4comm.ep.backend import DevicePlan, RowTargets
        from fp4comm.ep.message import CombineLayout
        T, K, R, El, H = 8, 8, 4, 2, 7168
        for B.KERNELS in B.KERNEL_VARIANTS:
            for payload in ("nvfp4", "fp8", "bf16"):
                msg = MessageLayout(payload, H, K)
                x = torch.zeros(T, H, dtype=torch.bfloat16)
                ids = torch.zeros(T, K, dtype=torch.int32); w = torch.zeros(T, K)
                ro = torch.zeros(T, R, dtype=torch.int32)
                dests = [torch.zeros(T, msg.row_bytes, dtype=torch.uint8) for _ in range(R)]
                gss = ["per_token", 1.0, torch.ones(T), torch.tensor(2.0)] if payload == "nvfp4" else ["per_token"]
                for gs in gss:
                    B.pack_rows(msg, x, ids, w, ro, dests, global_scale=gs, ue8m0=payload == "fp8")
                if B._v2("pack"):  # the nvlink early send: row bases from the exchanged counts
                    tab = torch.zeros(R, dtype=torch.int64)
                    dp = DevicePlan(torch.zeros(R * 16 + R, dtype=torch.int64), 16, 1, 64)
                    B.pack_rows(msg, x, ids, w, ro, RowTargets(None, tab, tab, dp), ue8m0=payload == "fp8")
                rows = torch.zeros(T, msg.row_bytes, dtype=torch.uint8)
                for layout in (("swizzled", "linear") if payload == "nvfp4" else ("linear",)):
                    p = B.permute_rows(msg, rows, expert_base=0, num_local_experts=El, max_m=128, scale_layout=layout)
                B._ONE_CHUNK_ROWS = 0  # the multi-chunk path (histogram kernel) too
                B.permute_rows(msg, torch.zeros(200, msg.row_bytes, dtype=torch.uint8), expert_base=0,
                               num_local_experts=El, max_m=256)
                # host_sync=False: the row count read on the device (histogram + index phases)
                B.permute_rows(msg, torch.zeros(200, msg.row_bytes, dtype=torch.uint8), expert_base=0,
                               num_local_experts=El, max_m=256, num_rows=torch.zeros(1, dtype=torch.int64))
                B._ONE_CHUNK_ROWS = 1024
            for dt in (torch.int32, torch.int64):
                for t in (T, 1):  # one token: one program (NPROG = 1 crashed sm_90 codegen as a constexpr)
                    L.layout_meta(torch.zeros(t, K, dtype=dt), 256, R, parallel=B.KERNELS == "v2")
            for wire in ("bf16", "fp8", "nvfp4"):
                rows = [torch.zeros(T, CombineLayout(wire, H).row_bytes, dtype=torch.uint8)] * R
                tg = RowTargets(rows, torch.zeros(R, dtype=torch.int64), torch.zeros(R, dtype=torch.int64))
                B.combine_expert(torch.zeros(El, 128, H, dtype=torch.bfloat16), torch.zeros(T, K, dtype=torch.int32),
                                 torch.zeros(El * 128), tg, torch.zeros(R, dtype=torch.int64), wire=wire)
                if wire == "bf16":  # the sources taken in turn (EPBuffer's order)
                    B.combine_expert(torch.zeros(El, 128, H, dtype=torch.bfloat16),
                                     torch.zeros(T, K, dtype=torch.int32), torch.zeros(El * 128), tg,
                                     torch.zeros(R, dtype=torch.int64), wire=wire, spread=(1, [T, 0, 0, 0]))
                B.combine_source(tg, torch.zeros(T, R, dtype=torch.int32), H, wire=wire)
        # bit-exact with torch needs mul + add, never a fused multiply-add, in the combine kernels
        for name, sig, consts, ptx in KERNELS:
            if name.startswith("ep_combine"):
                assert "fma.rn.f32" not in ptx, name
                assert "mul.rn.f32" in ptx or "mul.f32" in ptx or name == "ep_combine_source_kernel", name
        # v2 moves rows with 16-byte stores (v1: byte stores in pack, 2-byte stores in the bf16 combine)
        for name, sig, consts, ptx in KERNELS:
            if consts.get("V2") and name == "ep_combine_expert_kernel" and consts["CPAYLOAD"] == 2:
                assert "st.global.b16" not in ptx and "st.global.v4.b32" in ptx, name
            if consts.get("V2") and name == "ep_pack_kernel" and consts["PAYLOAD"] == 0:
                assert "st.global.b8" not in ptx and "st.global.v2.b64" in ptx, name
            if consts.get("V2") and name == "ep_combine_source_kernel" and consts["CPAYLOAD"] == 2:
                assert "ld.global.b16" not in ptx and "ld.global.v4.b32" in ptx, name
            if consts.get("SF_WORDS"):  # v2 nvfp4 permute: scales moved as words, never bytes
                assert "st.global.b8" not in ptx and "ld.global.b8" not in ptx and "ld.global.u8" not in ptx, name
        """
    )
    # distinct variants per KERNELS value (v1, v2: every kernel gets a V2 / tile variant): pack 4 nvfp4 gs
    # modes + fp8 + bf16 (6); permute: index kernel single-chunk and chunked (2) + histogram (1), shared by
    # all payloads; the copy per nvfp4 layout / fp8 / bf16 at max_m 128 (4) and again at max_m 256 (3);
    # combine (expert + source) x 3 wires (6); layout (int32 / int64 ids, 2): 24 each, and v2's
    # column scan of the chunk histograms (1) and pack with a device plan per payload (3); the
    # bf16 expert-side combine with the sources in turn (SPREAD, v1 and v2: 2); the histogram and
    # index phases with the row count read on the device (host_sync=False, v1 and v2: 4)
    import collections

    assert len(names) == 58, collections.Counter(names)
    assert {"ep_layout_kernel", "ep_pack_kernel", "ep_permute_hist_kernel", "ep_permute_index_kernel", "ep_permute_kernel",
            "ep_combine_expert_kernel", "ep_combine_source_kernel"} <= set(names), names
