"""The launch scripts in dry-run mode: the command they would run, with the shared defaults."""

import os
import subprocess
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def _dry_run(script: str, **env) -> str:
    e = {**os.environ, "DRY_RUN": "1", **env}
    p = subprocess.run(["bash", str(LAUNCH / script), "benchmarks/bench_dispatch.py", "--quick"],
                       capture_output=True, text=True, timeout=120, env=e)
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.mark.parametrize("script, count", [("run.sh", "--nproc-per-node=3"), ("mpirun.sh", "-np 3")])
def test_dry_run_prints_the_command(script, count):
    out = _dry_run(script, NGPU="3", NP="3")
    line = next(ln for ln in out.splitlines() if ln.startswith("would run:"))
    assert count in line and "benchmarks/bench_dispatch.py --quick" in line


def test_shared_defaults_keep_multicast_off():
    env = {k: v for k, v in os.environ.items() if k not in ("NCCL_NVLS_ENABLE", "NVSHMEM_DISABLE_NVLS")}
    p = subprocess.run(["bash", "-c", f'source "{LAUNCH / "_env.sh"}"; echo $NCCL_NVLS_ENABLE $NVSHMEM_DISABLE_NVLS '
                        "$TORCH_SYMM_MEM_DISABLE_MULTICAST $default_nproc"], capture_output=True, text=True, env=env)
    nvls, nvshmem, symm, nproc = p.stdout.split()
    assert (nvls, nvshmem, symm) == ("0", "1", "1") and int(nproc) >= 1


def test_usage_without_arguments():
    p = subprocess.run(["bash", str(LAUNCH / "run.sh")], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "NGPU" in p.stdout
