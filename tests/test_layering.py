"""Packages import downward only.

The order, bottom to top: model <- config <- layout <- optim <- parallel <- pipeline <- runtime
<- checkpoint <- train <- launch; kernels and fp8 are leaves used by parallel and runtime; the
planner sits on layout and parallel, interop on model, data on nothing above it; infer
(sampling from a trained checkpoint) on model, config, data, checkpoint and interop, and only
launch imports it. Imports inside functions (lazy) are allowed to go up, by design (e.g. the
FP8 recipe's hook in the pipeline's weight-gradient split); what a module imports when it is
imported may not.

Two checks: every module of the package, statically (the closure of its import-time imports,
read from the source: fast and complete), and a few modules for real, each imported alone in
a fresh interpreter whose ``sys.modules`` must hold nothing from above.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"hai_llm": REPO / "hai_llm", "hai_llm.kernels": REPO / "kernels", "hai_llm.launch": REPO / "launch"}

UPPER = {  # package -> packages it must not import at import time
    "model": ["config", "layout", "optim", "parallel", "pipeline", "runtime", "checkpoint", "train",
              "planner", "interop", "fp8", "infer", "launch"],
    "config": ["layout", "optim", "parallel", "pipeline", "runtime", "checkpoint", "train", "planner",
               "infer", "launch"],
    "data": ["layout", "optim", "parallel", "pipeline", "runtime", "checkpoint", "train", "planner",
             "infer", "launch"],
    "layout": ["optim", "parallel", "pipeline", "runtime", "checkpoint", "train", "planner", "fp8",
               "infer", "launch"],
    "optim": ["parallel", "pipeline", "runtime", "checkpoint", "train", "planner", "infer", "launch"],
    "kernels": ["model", "parallel", "pipeline", "runtime", "checkpoint", "train", "planner", "infer", "launch"],
    "fp8": ["parallel", "pipeline", "runtime", "checkpoint", "train", "planner", "infer", "launch"],
    "parallel": ["pipeline", "runtime", "checkpoint", "train", "planner", "interop", "infer", "launch"],
    "pipeline": ["fp8", "runtime", "checkpoint", "train", "planner", "interop", "infer", "launch"],
    "runtime": ["checkpoint", "train", "planner", "interop", "infer", "launch"],
    "checkpoint": ["pipeline", "runtime", "train", "planner", "interop", "infer", "launch"],
    "train": ["planner", "interop", "infer", "launch"],
    "planner": ["checkpoint", "train", "interop", "infer", "launch"],  # predicts the runtime's step: above it
    "interop": ["parallel", "pipeline", "runtime", "checkpoint", "train", "planner", "infer", "launch"],
    # inference: a trained checkpoint into one process; model, config, checkpoint, interop, data only;
    # only the launcher (hai-llm-sample) imports it
    "infer": ["layout", "optim", "parallel", "pipeline", "runtime", "train", "planner", "fp8", "launch"],
}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, root in ROOTS.items():
        for f in root.rglob("*.py"):
            rel = f.relative_to(root).with_suffix("").parts
            if rel[0] in ("kernels", "launch") and pkg == "hai_llm":
                continue
            name = ".".join((pkg,) + rel)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = f
    return out


def _import_time_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """hai_llm modules imported when ``name`` is imported (module and class bodies, not
    function bodies, not ``if TYPE_CHECKING:``)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    mod = ".".join(base[: len(base) - node.level + 1] + ([mod] if mod else []))
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
            for field in ("body", "orelse", "finalbody", "handlers"):
                visit(getattr(node, field, []) or [])

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    out = set()
    for m in found:
        parts = m.split(".")
        for i in range(2, len(parts) + 1):  # importing a.b.c runs a.b's __init__ too
            if ".".join(parts[:i]) in known:
                out.add(".".join(parts[:i]))
    return out


def test_every_module_imports_downward_only():
    mods = _modules()
    known = set(mods)
    direct = {m: _import_time_imports(m, p, known) for m, p in mods.items()}
    bad = []
    for m in sorted(mods):
        pkg = m.split(".")[1] if m.count(".") else None
        if pkg not in UPPER:
            continue
        seen, todo = set(), [m]
        while todo:  # closure of import-time imports
            x = todo.pop()
            for y in direct.get(x, ()):
                if y not in seen:
                    seen.add(y)
                    todo.append(y)
        for upper in UPPER[pkg]:
            hits = sorted(y for y in seen if y.split(".")[1] == upper)
            if hits:
                bad.append(f"import {m} imports {hits[0]}: hai_llm.{pkg} must not import hai_llm.{upper}")
    assert not bad, "\n".join(bad)


PROBE = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
         "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith('hai_llm.'))))")


@pytest.mark.dist
def test_fresh_interpreter_sees_no_upward_import():
    """What Python really loads, for the packages whose layering the redesign broke cycles in."""
    cases = {"hai_llm.parallel.zero": ["train", "runtime", "pipeline"],
             "hai_llm.pipeline.executor": ["fp8", "runtime", "train"],
             "hai_llm.layout": ["parallel", "pipeline", "runtime", "train"]}
    procs = {m: subprocess.Popen([sys.executable, "-c", PROBE, m], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for m in cases}
    for m, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (m, err[-2000:])
        loaded = json.loads(out.strip().splitlines()[-1])
        for upper in cases[m]:
            assert not [x for x in loaded if x.startswith(f"hai_llm.{upper}")], (m, upper, loaded)
        if m == "hai_llm.layout":  # deciding a layout is plain Python: no torch
            assert "torch" not in loaded, loaded
