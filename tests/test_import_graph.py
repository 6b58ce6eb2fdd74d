"""The package has no import circles, counting the imports inside functions too (the two the
models/ reorganisation removed were lazy ones: maskgen_base -> maskgen_vq/kl -> maskgen_base,
training.config <-> training.spec)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tatitok_fast

ROOT = Path(tatitok_fast.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ("tatitok_fast",) + path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its body (resolved to the longest known module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods or a.name == "_C" else base
                       for a in node.names]
        else:
            continue
        for target in targets:
            if target.endswith("._C"):  # the native extension: no Python module behind it
                continue
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycles():
    mods = _modules()
    graph = {name: _imports(name, path, mods) for name, path in mods.items()}
    assert "tatitok_fast.models.generators.maskgen_vq" in graph["tatitok_fast.models.generators.maskgen"]
    assert _cycles(graph) == []


def test_models_are_grouped_by_role():
    """Tokenizers, generators, shared layers and losses each have their own folder."""
    for folder in ("models/tokenizers", "models/generators", "models/nn", "losses"):
        assert (ROOT / folder / "__init__.py").is_file(), folder
    stray = sorted(p.name for p in (ROOT / "models").glob("*.py") if p.name != "__init__.py")
    assert stray == [], f"modules directly under models/: {stray}"


def test_cli_import_leaves_the_compiler_stack_unloaded():
    """`import tatitok_fast.cli` in a fresh process (what every `tatitok-fast` command pays)
    loads neither torch._dynamo nor torch._inductor, about 2 s of imports on a 2-core machine:
    the Triton ops register on first use, and the CPU bf16 probe is a plain dict. Where CUDA is
    available the Triton ops register at import (before any compile trace), through
    torch._inductor: skipped there."""
    if torch.cuda.is_available():
        pytest.skip("with CUDA the Triton ops register at import, through torch._inductor")
    code = ("import sys, tatitok_fast.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", proc.stdout
