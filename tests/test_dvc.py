"""DVC: ``dvc repro`` of the pipeline on a temporary copy of the repo (tiny configuration),
``dvc exp run -S merge.method=ties``, and ``dvc push``/``dvc pull`` through a local remote
and an S3 remote (SeaweedFS ``weed mini`` started here) into fresh clones."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_layers import graph

from conftest import ROOT
from servers import SeaweedS3

STAGE_MODULE = re.compile(r"python -m (pipelines\.\w+)")
VENV_BIN = str(Path(sys.executable).parent)


def sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env or os.environ.copy(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def imported_files(module: str, edges: dict[str, set[str]]) -> set[str]:
    """Every project file that importing ``module`` runs: the modules it reaches and their packages' __init__."""
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += [d for d in edges.get(m, ()) if d in edges]
    packages = {".".join(m.split(".")[:i]) for m in seen for i in range(1, m.count(".") + 1)}
    return {str(Path(*m.split(".")).with_suffix(".py")) for m in seen - packages} | {
        str(Path(*p.split(".")) / "__init__.py") for p in packages | (seen & packages)
    }


def stage_deps() -> dict[str, tuple[str, list[str]]]:
    """Each dvc.yaml stage: the pipelines module its cmd runs, and its deps."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    out = {}
    for name, stage in stages.items():
        body = stage.get("do", stage)
        out[name] = (STAGE_MODULE.search(body["cmd"]).group(1), [str(d) for d in body["deps"]])
    return out


def uncovered(files: set[str], deps: list[str]) -> list[str]:
    """The files that no dep names, itself or as a folder above it."""
    return sorted(f for f in files if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps))


def test_every_module_a_stage_imports_is_in_its_deps():
    """An edit to any module a stage's code imports reruns the stage: deps cover it by file or by package."""
    edges = graph()
    assert [type(n) for n in ast.parse((ROOT / "pipelines" / "__init__.py").read_text()).body] == [ast.Expr]
    for name, (module, deps) in stage_deps().items():
        files = imported_files(module, edges) - {"pipelines/__init__.py"}  # a docstring only (checked above)
        assert any(f.startswith("medvec/") for f in files), (name, files)
        missing = uncovered(files, deps)
        assert missing == [], f"dvc.yaml stage {name!r} imports {missing} without depending on them"


def test_the_coverage_check_notices_a_missing_package_or_module():
    """Taking medvec/coordinator or medvec/store.py out of the merge stage's deps is caught."""
    module, deps = stage_deps()["merge"]
    files = imported_files(module, graph()) - {"pipelines/__init__.py"}
    assert uncovered(files, deps) == []
    assert "medvec/coordinator/engine.py" in uncovered(files, [d for d in deps if d != "medvec/coordinator"])
    assert uncovered(files, [d for d in deps if d != "medvec/store.py"]) == ["medvec/store.py"]


@pytest.fixture(scope="module")
def env():
    e = os.environ.copy()
    e["PATH"] = VENV_BIN + os.pathsep + e.get("PATH", "")  # stages run `python` from the venv
    e["DVC_NO_ANALYTICS"] = "1"
    e["MEDVEC_THREADS"] = "2"
    e["GIT_AUTHOR_NAME"] = e["GIT_COMMITTER_NAME"] = "medvec-test"
    e["GIT_AUTHOR_EMAIL"] = e["GIT_COMMITTER_EMAIL"] = "medvec-test@example.org"
    return e


@pytest.fixture(scope="module")
def repo(tmp_path_factory, env):
    """A copy of the project's tracked files with a tiny configuration, reproduced once."""
    tmp = tmp_path_factory.mktemp("dvc")
    repo = tmp / "repo"
    files = sh(["git", "ls-files", "-co", "--exclude-standard"], ROOT, env).split()
    for f in files:
        if (
            f.startswith(("data/pneumonia", "work/", "benchmarks/results", "reports/"))
            or f == "dvc.lock"
            or not (ROOT / f).is_file()
        ):
            continue
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["split"].update(hospitals=2, names=["h1", "h2"])
    p["model"].update(name="tiny_cnn", pretrained=False, image_size=None)
    p["finetune"].update(epochs=2, threads=2)
    p["merge"].update(method="weighted", lam=1.0)
    p["batchnorm"].update(strategy="average")
    p["coordinator"]["eval_data"] = p["demo"]["data"] = "data/breastmnist.npz"
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    remote = tmp / "local-remote"
    sh(["git", "init", "-q"], repo, env)
    sh([f"{VENV_BIN}/dvc", "remote", "add", "-d", "-f", "local", str(remote)], repo, env)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "tiny medvec"], repo, env)
    sh([f"{VENV_BIN}/dvc", "repro"], repo, env, timeout=900)
    sh(["git", "add", "-A"], repo, env)
    sh(["git", "commit", "-qm", "repro"], repo, env)
    return {"repo": repo, "tmp": tmp, "remote": remote}


@pytest.mark.integration
def test_repro_builds_every_stage(repo):
    r = repo["repo"]
    lock = yaml.safe_load((r / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"split", "base", "finetune@h1", "finetune@h2", "merge", "evaluate"}
    for h in ("h1", "h2"):
        assert (r / "work" / "vectors" / f"{h}.safetensors").stat().st_size > 0
    merge = yaml.safe_load((r / "work" / "merge.json").read_text())
    assert merge["method"] == "weighted" and len(merge["inputs"]) == 2
    # finished as the flows finish a merge, into the stage's own store; an experiment registers nowhere
    assert (r / "work" / "store" / merge["weights_key"]).is_file() and merge["registry"] is None
    assert merge["params"]["registry"]["enabled"] is False and merge["params"]["registry"]["dvc_repo"] is None
    assert 0.0 <= yaml.safe_load((r / "work" / "metrics.json").read_text())["auc"] <= 1.0


@pytest.mark.integration
def test_repro_is_up_to_date_and_exp_run_changes_the_method(repo, env):
    r = repo["repo"]
    status = sh([f"{VENV_BIN}/dvc", "status"], r, env)
    assert "up to date" in status.lower(), status
    sh([f"{VENV_BIN}/dvc", "exp", "run", "-S", "merge.method=ties"], r, env, timeout=600)
    assert yaml.safe_load((r / "work" / "merge.json").read_text())["method"] == "ties"
    shown = sh([f"{VENV_BIN}/dvc", "exp", "show", "--no-pager", "--csv"], r, env)
    assert "ties" in shown
    sh(["git", "checkout", "--", "."], r, env)
    sh([f"{VENV_BIN}/dvc", "checkout", "--force"], r, env)


def _clone_and_pull(repo: Path, dest: Path, env: dict, remote_args: list[str]) -> None:
    sh(["git", "clone", "-q", str(repo), str(dest)], dest.parent, env)
    sh([f"{VENV_BIN}/dvc", "pull", *remote_args], dest, env, timeout=300)


def _same_vectors(a: Path, b: Path) -> None:
    for h in ("h1", "h2"):
        assert (a / "work" / "vectors" / f"{h}.safetensors").read_bytes() == (
            b / "work" / "vectors" / f"{h}.safetensors"
        ).read_bytes()


@pytest.mark.integration
def test_push_pull_local_remote(repo, env):
    r = repo["repo"]
    sh([f"{VENV_BIN}/dvc", "push"], r, env, timeout=300)
    clone = repo["tmp"] / "clone-local"
    _clone_and_pull(r, clone, env, [])
    _same_vectors(r, clone)


@pytest.mark.integration
def test_push_pull_s3_remote(repo, env):
    s3 = SeaweedS3(repo["tmp"] / "s3")
    try:
        s3.client().create_bucket(Bucket="medvec-dvc")
        e = {**env, **s3.env()}
        r = repo["repo"]
        sh([f"{VENV_BIN}/dvc", "remote", "add", "-f", "s3", "s3://medvec-dvc/cache"], r, e)
        sh([f"{VENV_BIN}/dvc", "remote", "modify", "s3", "endpointurl", s3.endpoint], r, e)
        sh(["git", "commit", "-qam", "s3 remote"], r, e)
        sh([f"{VENV_BIN}/dvc", "push", "-r", "s3"], r, e, timeout=300)
        keys = s3.client().list_objects_v2(Bucket="medvec-dvc").get("KeyCount", 0)
        assert keys > 0
        clone = repo["tmp"] / "clone-s3"
        _clone_and_pull(r, clone, e, ["-r", "s3"])
        _same_vectors(r, clone)
    finally:
        s3.stop()
