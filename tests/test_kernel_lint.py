"""Static checks on ``kernels/`` for mistakes the Triton interpreter accepts but the GPU
compiler rejects (so CPU-only CI catches them), and for the layering rule."""

import ast
from pathlib import Path

import pytest

KERNEL_FILES = sorted((Path(__file__).resolve().parents[1] / "kernels").glob("*.py"))


def _is_constexpr_annotation(node: ast.AST) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == "constexpr"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_no_annotated_constexpr_globals(path):
    # `X: tl.constexpr = 1` at module level works under TRITON_INTERPRET=1 but the compiler
    # raises "Cannot access global variable X"; `X = tl.constexpr(1)` works on both.
    tree = ast.parse(path.read_text())
    bad = [
        f"{path.name}:{n.lineno} {ast.unparse(n.target)}"
        for n in tree.body
        if isinstance(n, ast.AnnAssign) and _is_constexpr_annotation(n.annotation)
    ]
    assert not bad, f"use NAME = tl.constexpr(value) instead of an annotation: {bad}"


@pytest.mark.parametrize("path", KERNEL_FILES, ids=lambda p: p.name)
def test_kernels_import_no_host_modules(path):
    # DESIGN.md layering: kernels never import fp4comm host modules (only triton and siblings)
    tree = ast.parse(path.read_text())
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            assert n.module.split(".")[0] in ("triton", "__future__", "math", "typing"), f"{path.name}: {n.module}"
        if isinstance(n, ast.Import):
            for a in n.names:
                assert a.name.split(".")[0] in ("triton", "math", "typing"), f"{path.name}: {a.name}"
