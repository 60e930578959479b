"""The layers and sides of DESIGN.md, read from the source (every import, function-level ones included).

- No import cycle between modules, and no import that climbs back up a layer (:data:`LAYERS`).
- ``medvec.hospital`` and ``medvec.coordinator`` import nothing from each other: only the layers above them
  (``medvec.demo``, ``medvec.tracking`` and the front doors) use both.
- The core (``medvec`` without ``medvec.tracking``) imports no Prefect, MLflow or DVC module, and nothing from
  ``flows``, ``tasks`` or ``pipelines``; importing every core module loads none of them either.
- Only ``medvec.tracking`` imports MLflow; only ``flows`` and ``tasks`` import Prefect.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("medvec", "flows", "tasks", "pipelines")
FRAMEWORKS = ("prefect", "mlflow", "dvc")
# lowest first; a module may import its own layer or a lower one (a name ending in "." is a package prefix)
LAYERS: tuple[tuple[str, ...], ...] = (
    ("medvec", "medvec.errors", "medvec.faults", "medvec.timing", "medvec.retry", "medvec.names"),
    ("medvec.config",),
    ("medvec.data.",),
    ("medvec.models", "medvec.batchnorm", "medvec.runtime", "medvec.keys"),
    ("medvec.preprocess", "medvec.vectors."),
    ("medvec.evaluate", "medvec.histograms", "medvec.serving"),
    ("medvec.record", "medvec.answers"),
    ("medvec.store",),
    ("medvec.hospital.", "medvec.coordinator."),
    ("medvec.demo.", "medvec.tracking."),
    ("tasks", "tasks.", "pipelines."),
    ("flows", "flows."),
)
SIDES = ("medvec.hospital", "medvec.coordinator")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imports(path: Path, name: str, known: Iterable[str]) -> set[str]:
    """The modules ``path`` imports anywhere in its body: project modules by dotted name, others by top name."""
    known = set(known)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:  # `from pkg import module` names the module itself
                full = f"{base}.{alias.name}"
                out.add(full if full in known else base)
    return {m if m.split(".")[0] in PACKAGES else m.split(".")[0] for m in out if m}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module → the project modules and third-party top-level packages it imports (itself and packages' own
    ``__init__`` excluded)."""
    found = modules(root)
    out = {}
    for name, path in found.items():
        deps = imports(path, name, found)
        out[name] = {d for d in deps if d != name and not (d in found and name.startswith(d + "."))}
    return out


def layer(name: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(name == m or (m.endswith(".") and name.startswith(m)) for m in members):
            return rank
    raise AssertionError(f"{name} is in no layer of tests/test_layers.py: add it to LAYERS")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module, or with a self-loop (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                on.discard(w)
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in edges.get(v, ()):
                found.append(sorted(part))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def violations(edges: dict[str, set[str]]) -> list[str]:
    """Each rule of this file that an import breaks, one line per import."""
    out = [f"cycle: {' ↔ '.join(c)}" for c in cycles(edges)]
    for mod, deps in sorted(edges.items()):
        project = sorted(d for d in deps if d in edges)
        out += [
            f"{mod} → {d} climbs from layer {layer(mod)} up to {layer(d)}" for d in project if layer(d) > layer(mod)
        ]
        for side, other in (SIDES, SIDES[::-1]):
            if mod.startswith(side + "."):
                out += [f"{mod} → {d}: the {side} side imports the other" for d in project if d.startswith(other + ".")]
        core = mod.startswith("medvec") and not mod.startswith("medvec.tracking")
        outside = [d for d in deps if d.split(".")[0] in ("flows", "tasks", "pipelines", *FRAMEWORKS)]
        if core:
            out += [f"{mod} → {d}: the core imports a framework or a front door" for d in sorted(outside)]
        if "mlflow" in deps and not mod.startswith("medvec.tracking"):
            out.append(f"{mod} → mlflow: only medvec.tracking imports MLflow")
        if "prefect" in deps and not mod.startswith(("flows", "tasks")):
            out.append(f"{mod} → prefect: only flows and tasks import Prefect")
    return out


def test_every_module_keeps_the_layers_sides_and_frameworks_apart():
    edges = graph()
    assert {"medvec.hospital.finetune", "medvec.coordinator.engine", "flows.cli"} <= set(edges)
    assert violations(edges) == []


def _copy(tmp_path: Path) -> Path:
    for path in modules().values():
        target = tmp_path / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(path.read_text())
    return tmp_path


@pytest.mark.parametrize(
    ("module", "line", "broken"),
    [
        ("medvec/store.py", "from medvec.coordinator.engine import BnPlan", "climbs"),
        ("medvec/hospital/finetune.py", "from medvec.coordinator.scoring import score", "imports the other"),
        ("medvec/coordinator/engine.py", "from medvec.hospital.local import LocalData", "imports the other"),
        ("medvec/vectors/vector.py", "from medvec.vectors.file import VectorFile", "cycle"),
        ("medvec/coordinator/engine.py", "import prefect", "framework"),
        ("medvec/models.py", "import mlflow", "only medvec.tracking imports MLflow"),
        ("pipelines/merge.py", "from prefect import task", "only flows and tasks import Prefect"),
    ],
)
def test_the_rules_catch_an_import_that_breaks_them(tmp_path, module, line, broken):
    """Each rule fails on one import added inside a function (lazy imports count)."""
    root = _copy(tmp_path)
    path = root / module
    path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}\n")
    found = violations(graph(root))
    assert any(broken in v for v in found), found


PROBE = """
import importlib, json, pkgutil, sys
import medvec
names = sorted(m.name for m in pkgutil.walk_packages(medvec.__path__, "medvec."))
for name in names:
    if not name.startswith("medvec.tracking"):
        importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def test_importing_the_core_loads_no_framework_or_front_door():
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps([*FRAMEWORKS, "flows", "tasks", "pipelines"])],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(out["modules"]) == {m for m in modules() if m.startswith("medvec.")}  # every core module imported
    assert out["loaded"] == [], f"importing the core loaded {out['loaded']}"
