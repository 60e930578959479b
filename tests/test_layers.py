"""The layers of DESIGN.md: the core imports no orchestration, tracking or versioning framework."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

FRAMEWORKS = ("prefect", "flows", "tasks", "pipelines", "mlflow", "dvc")

PROBE = """
import importlib, json, pkgutil, sys
import medvec
names = sorted(m.name for m in pkgutil.iter_modules(medvec.__path__, "medvec."))
for name in names:
    if name != "medvec.tracking":
        importlib.import_module(name)
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.argv[1])))
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def probe() -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(FRAMEWORKS)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_core_loads_no_prefect_mlflow_dvc_flows_or_tasks_module():
    out = probe()
    expected = {f"medvec.{p.stem}" for p in (ROOT / "medvec").glob("*.py") if p.stem != "__init__"}
    assert set(out["modules"]) == expected  # every core module was imported
    assert out["loaded"] == [], f"importing the core loaded {out['loaded']}"


def test_only_the_tracking_module_imports_mlflow_and_only_flows_and_tasks_import_prefect():
    """Statically too; ``medvec/cli.py`` is exempt: the command reaches the front doors lazily, per command."""
    for path in Path(ROOT, "medvec").glob("*.py"):
        if path.stem == "cli":
            continue
        text = path.read_text()
        if path.stem != "tracking":
            assert "import mlflow" not in text and "from mlflow" not in text, path
        assert "from prefect" not in text and "import prefect" not in text, path
