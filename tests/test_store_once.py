"""Each flow run opens the store once and hands it to every task: a hospital's run (which logs the vector it
published to MLflow without reading it back from the store) and a merge run (admit, merge, finish, rows).

The flows run for real in a child process (Prefect's ephemeral mode, a local store, MLflow on SQLite);
the child counts every store it opens, per flow run."""

from __future__ import annotations

import os

import pytest

from conftest import TINY_FLOW
from servers import run_driver

pytestmark = pytest.mark.integration

SCRIPT = """
import json, sys
from collections import Counter
import medvec.store
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.models import create_base

opened = Counter()
phase = ["setup"]
init = medvec.store.LocalStore.__init__

def counting(self, root):
    opened[phase[0]] += 1
    init(self, root)

medvec.store.LocalStore.__init__ = counting
from flows.hospital_finetune import hospital_finetune
from flows.merge_and_evaluate import merge_and_evaluate

tmp, overrides = sys.argv[1], json.loads(sys.argv[2])
data = "data/breastmnist.npz"
p = load_params(None, overrides)
write_hospital_shards(data, tmp + "/h", hospitals=2, alpha=1.0, seed=0)
store = medvec.store.open_store(tmp + "/store")
store.put_base(create_base("tiny_cnn", 2, pretrained=False, seed=0))
for h in ("h1", "h2"):
    phase[0] = "hospital-" + h
    hospital_finetune(h, tmp + "/h/" + h, tmp + "/store", params=p, emit=False, progress=False)
phase[0] = "merge"
out = merge_and_evaluate(tmp + "/store", data, p)
print(json.dumps({"opened": opened, "merge_id": out.get("merge_id"), "registry": out.get("registry")}))
"""

OVERRIDES = [
    *TINY_FLOW,
    "finetune.epochs=1",
    "merge.method=mean",
    "merge.lam=1.0",
    "batchnorm.strategy=recompute",
    "contribution.method=loo",
    "evaluate.where=coordinator",  # the merge reads the coordinator's set here (data/breastmnist.npz)
]


def test_a_hospital_run_and_a_merge_run_each_open_the_store_once(tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    out = run_driver(SCRIPT, tmp_path, OVERRIDES, env)
    assert out["registry"]["champion"] is True and out["merge_id"]  # the whole path ran: registered
    assert out["opened"] == {"setup": 1, "hospital-h1": 1, "hospital-h2": 1, "merge": 1}
