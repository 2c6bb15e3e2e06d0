"""The README's two fresh-machine commands, and CI running the test one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    main_job, tests = cmds
    assert main_job.startswith("pip install -e") and "benchmarks/bench_dispatch.py" in main_job
    assert tests.startswith("pip install -e") and "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    tests = _setup_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], (tests, ci)
