"""``python -m fp4comm --version | --info``: versions and what this machine offers."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys


def _version(mod: str) -> str:
    try:
        if importlib.util.find_spec(mod) is None:
            return "not installed"
    except ModuleNotFoundError:  # parent package missing
        return "not installed"
    try:
        m = importlib.import_module(mod)
        return str(getattr(m, "__version__", "installed"))
    except Exception as e:  # a broken optional install is reported, not fatal
        return f"import failed ({type(e).__name__}: {e})"


def info() -> dict:
    import torch

    import fp4comm

    from ._runtime import triton_interpreting

    out: dict = {
        "fp4comm": fp4comm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "nvshmem4py": _version("nvshmem.core"),
        "mpi4py": _version("mpi4py"),
        "triton_interpreter": triton_interpreting(),
        "gpus": [],
        "peer_access": {},
    }
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        out["gpus"].append(
            {"index": i, "name": p.name, "sm": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
             "memory_gib": round(p.total_memory / 2**30, 1)}
        )  # fmt: skip
        out["peer_access"][i] = [j for j in range(n) if j != i and torch.cuda.can_device_access_peer(i, j)]
    import torch.distributed as dist

    dist_ok = dist.is_available()
    out["backends"] = {
        "torch/gloo": dist_ok and dist.is_gloo_available(),
        "torch/nccl": dist_ok and n > 0 and dist.is_nccl_available(),
        "nvlink": n >= 2
        and all(len(v) == n - 1 for v in out["peer_access"].values())
        and out["nvshmem4py"] not in ("not installed",)
        and not out["nvshmem4py"].startswith("import failed"),
        "mpirun launch": out["mpi4py"] != "not installed",
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fp4comm", description=__doc__)
    ap.add_argument("--version", action="store_true", help="print the fp4comm version and exit")
    ap.add_argument("--info", action="store_true", help="print versions, GPUs, NVLink peers and backends")
    args = ap.parse_args(argv)
    if args.version or not args.info:
        import fp4comm

        print(f"fp4comm {fp4comm.__version__}")
        if not args.info:
            return 0
    d = info()
    width = 22
    for k in ("fp4comm", "python", "torch", "triton", "nvshmem4py", "mpi4py", "triton_interpreter"):
        print(f"{k:<{width}}  {d[k]}")
    if d["gpus"]:
        for g in d["gpus"]:
            peers = d["peer_access"][g["index"]]
            print(f"gpu {g['index']:<{width - 4}}  {g['name']} (sm_{g['sm'].replace('.', '')}, {g['sms']} SMs, "
                  f"{g['memory_gib']} GiB), peer access to {peers or 'none'}")  # fmt: skip
    else:
        print(f"{'gpus':<{width}}  none (Triton kernels need TRITON_INTERPRET=1 on CPU; references run otherwise)")
    for k, v in d["backends"].items():
        print(f"{'backend ' + k:<{width}}  {'available' if v else 'unavailable'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
