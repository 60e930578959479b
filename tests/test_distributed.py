"""The distributed path on real servers: a Prefect server, one process worker per
hospital pool and one for the coordinator, and an S3-compatible store (SeaweedFS
``weed mini``), all started here on 127.0.0.1.  No mocks.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from typing import Any

import pytest

from conftest import BREAST, ROOT, TINY_FLOW
from servers import PrefectServer, Probe, SeaweedS3, Worker, medvec, wait_until

pytestmark = pytest.mark.integration

OVERRIDES = [
    *TINY_FLOW,
    "merge.method=weighted",
    "merge.lam=1.0",
    "batchnorm.strategy=average",
    f"coordinator.eval_data={BREAST}",
    "evaluate.where=coordinator",  # these tests are of the coordinator's own set; hospitals: test_tenancy
]


def sets(store_url: str) -> list[str]:
    out = []
    for o in OVERRIDES + [f"store.url={store_url}"]:
        out += ["-S", o]
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Prefect server + S3 server + coordinator deployment and worker."""
    tmp = tmp_path_factory.mktemp("cluster")
    s3 = SeaweedS3(tmp / "s3")
    server = PrefectServer(tmp / "prefect")
    env = {**server.client_env(), **s3.env()}
    store_url = f"s3://medvec/run?endpoint_url={s3.endpoint}"
    workers: list[Worker] = []
    probe = Probe(env)  # polls the store, Prefect and MLflow as a client with env, importing them once
    try:
        medvec(env, "coordinator", "up", *sets(store_url))
        workers.append(Worker("coordinator", env, tmp))
        yield {
            "tmp": tmp,
            "env": env,
            "server": server,
            "s3": s3,
            "store_url": store_url,
            "workers": workers,
            "probe": probe,
        }
    finally:
        probe.stop()
        for w in workers:
            w.stop()
        server.stop()
        s3.stop()


def api(probe: Probe, code: str, timeout: float = 60) -> Any:
    """Run a snippet against the Prefect API in the cluster's probe (a child whose settings come from env)."""
    script = "import json, asyncio\nfrom prefect.client.orchestration import get_client\n" + code
    return probe.json(script, timeout=timeout)


MERGE_RUNS = """
with get_client(sync_client=True) as c:
    dep = c.read_deployment_by_name("merge-and-evaluate/coordinator")
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    runs = c.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
    autos = c.read_automations()
    linked = [str(a.id) for a in autos if any(getattr(x, "deployment_id", None) == dep.id for x in a.actions)]
    arts = {}
    for r in runs:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
        for a in c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id]))):
            arts.setdefault(str(r.id), []).append({"key": a.key, "type": a.type, "data": a.data if isinstance(a.data, str) else json.dumps(a.data)})
    print(json.dumps({"automations": linked, "schedules": [s.schedule.interval.total_seconds() for s in c.read_deployment_schedules(dep.id) if getattr(s.schedule, "interval", None)],
        "runs": [{"id": str(r.id), "name": r.name, "tags": sorted(r.tags), "state": r.state.type.value, "message": r.state.message, "key": r.idempotency_key, "params": r.parameters, "created": r.created.isoformat(), "expected": r.expected_start_time.isoformat() if r.expected_start_time else None} for r in runs], "artifacts": arts}))
"""


HOSPITAL_RUNS = """
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
with get_client(sync_client=True) as c:
    runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["hospital-finetune"])))
    # the server holds no parameters of a hospital's run (its site file does): the hospital is in the tags
    print(json.dumps([{"name": r.name, "tags": sorted(r.tags), "params": r.parameters,
        "hospital": next(t.split(":", 1)[1] for t in r.tags if t.startswith("hospital:"))}
        for r in runs if r.state.type.value == "COMPLETED"]))  # a scheduled run is named when it starts
"""


def merged_ids(probe: Probe, store_url: str) -> list[list[str]]:
    code = (
        "import json, os\nfrom medvec.store import open_store\ns = open_store(%r)\n"
        "print(json.dumps([[i.vector_id for i in m.inputs] for m in s.merges(s.current_base())]))" % store_url
    )
    return probe.json(code)


def final_merge_run(probe: Probe, ids: list[str]):
    """(API info, run) for a COMPLETED merge run created by the trigger automation whose
    markdown artifact lists every id in ``ids``; None while there is none."""
    info = api(probe, MERGE_RUNS)
    for auto in info["automations"]:
        for r in info["runs"]:
            if r["state"] == "COMPLETED" and (r["key"] or "").startswith(f"automation {auto}"):
                for a in info["artifacts"].get(r["id"], []):
                    if a["key"] == "merge-report" and all(i in a["data"] for i in ids):
                        return info, r
    return None


def tracked_merge(probe: Probe, merge_id: str) -> dict:
    """The merge run in the coordinator's MLflow (a SQLite file here): its contribution table, plots and metrics."""
    code = f"""
import json, mlflow
from mlflow import MlflowClient
c = MlflowClient()
exp = c.get_experiment_by_name("medvec-merges")
run = c.search_runs([exp.experiment_id], filter_string="tags.`medvec.merge_id` = '{merge_id}'")[0]
table = json.load(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="contributions.json")))
files = [f.path for f in c.list_artifacts(run.info.run_id, "plots")]
print(json.dumps({{"table": table, "plots": files, "metrics": run.data.metrics}}))
"""
    return probe.json(code)


def test_two_hospitals_on_their_own_workers_trigger_the_merge(cluster):
    env, tmp, store_url, probe = cluster["env"], cluster["tmp"], cluster["store_url"], cluster["probe"]
    from medvec.data.split import write_hospital_shards

    write_hospital_shards(BREAST, tmp / "hospitals", hospitals=2, alpha=1.0, seed=0)
    # h2's data as a PACS export: DICOM files (MONOCHROME1, rescale + window, RLE among them) and a CSV manifest
    from medvec.data.examples import write_manifest
    from medvec.data.sources import load_split

    h2 = {s: load_split(tmp / "hospitals" / "h2", s) for s in ("train", "val")}
    data = {"h1": tmp / "hospitals" / "h1", "h2": write_manifest(h2, tmp / "h2-export", "dicom", progress=False)}
    for name in ("h1", "h2"):
        out = medvec(env, "hospital", "join", name, "--data", str(data[name]), "--no-worker", *sets(store_url))
        assert f"hospital-finetune/{name}" in out.stdout and f"medvec hospital worker {name}" in out.stdout
        assert "data check:" in out.stdout and "usable" in out.stdout
        cluster["workers"].append(Worker(f"hospital-{name}", env, tmp))
    # MLOps: a retraining schedule, changed later, visible through the API
    medvec(env, "hospital", "schedule", "h1", "--cron", "0 2 * * 0")
    sched = api(
        probe,
        """
with get_client(sync_client=True) as c:
    dep = c.read_deployment_by_name("hospital-finetune/h1")
    print(json.dumps([s.schedule.cron for s in c.read_deployment_schedules(dep.id)]))
""",
    )
    assert sched == ["0 2 * * 0"]
    for name in ("h1", "h2"):
        out = medvec(env, "hospital", "run", name, "--timeout", "240", timeout=300)
        assert "COMPLETED" in out.stdout
    vectors = json.loads(medvec(env, "vectors", "list", "--json", *sets(store_url)).stdout)
    ids = sorted(v["vector_id"] for v in vectors)
    assert [v["hospital"] for v in sorted(vectors, key=lambda v: v["hospital"])] == ["h1", "h2"]

    wait_until(lambda: any(sorted(m) == ids for m in merged_ids(probe, store_url)), 180, "a merge of both vectors")
    info, run = wait_until(
        lambda: final_merge_run(probe, ids), 90, "a completed, triggered merge run whose artifact lists both vectors"
    )
    assert info["automations"], "the deployment has no trigger automation"
    assert run["params"]["trigger"]["vector"].startswith("medvec.vector.")  # the trigger passes the landed event in
    final = [run]
    assert {a["key"] for a in info["artifacts"][final[0]["id"]]} == {"merge-report", "merge-metrics"}
    assert 3600.0 in info["schedules"]  # the hourly reconciling schedule
    # the UI tells runs apart: the merge run is named by its merge id, a hospital's by hospital and date
    merge_id = run["name"]
    assert merge_id.startswith("merge-") and {f"merge:{merge_id}", "mode:oneshot"} <= set(run["tags"])
    assert any(merge_id in a["data"] for a in info["artifacts"][run["id"]])
    # what each hospital contributed: in the Prefect merge report and in the MLflow merge run
    report = next(a["data"] for a in info["artifacts"][run["id"]] if a["key"] == "merge-report")
    assert "**What each input contributed**" in report
    for vid in ids:
        assert re.search(rf"\| h[12] \| `{vid}` \| [+-]\d\.\d{{4}} ± \d\.\d{{4}} \| – \| ok \|", report), report
    tracked = tracked_merge(probe, merge_id)
    table = [dict(zip(tracked["table"]["columns"], row)) for row in tracked["table"]["data"]]
    assert sorted(r["vector_id"] for r in table) == ids and {r["verdict"] for r in table} == {"ok"}
    assert "plots/contributions.png" in tracked["plots"]
    loo = sorted(tracked["metrics"][f"contribution_loo.{n}"] for n in (0, 1))
    assert loo == pytest.approx(sorted(r["loo"] for r in table), abs=1e-9)  # the table keeps 10 digits
    ran = api(probe, HOSPITAL_RUNS)
    assert sorted(h["hospital"] for h in ran) == ["h1", "h2"]
    for h in ran:
        assert re.fullmatch(rf"hospital-finetune/{h['hospital']} \d{{4}}-\d{{2}}-\d{{2}}", h["name"]), h
        assert any(t.startswith("base:") for t in h["tags"]) and h["params"] == {}, h


def merges_settled(probe: Probe) -> list[dict] | None:
    """The merge deployment's runs once none is pending, running or scheduled within a minute (the hourly
    reconciling run is not); None while one is. A triggered run that waits for the concurrency slot runs
    later and merges whatever the store holds by then."""
    import datetime as dt

    runs = api(probe, MERGE_RUNS)["runs"]
    soon = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=60)
    due = [
        r
        for r in runs
        if r["state"] in ("PENDING", "RUNNING")
        or (r["state"] == "SCHEDULED" and dt.datetime.fromisoformat(r["expected"]) < soon)
    ]
    return None if due else runs


def test_a_lost_event_is_reconciled(cluster):
    """Publish with events switched off: no trigger fires, the reconciling run merges it."""
    env, tmp, store_url, probe = cluster["env"], cluster["tmp"], cluster["store_url"], cluster["probe"]
    # the earlier test's triggered runs have all ended: a late one would merge this test's vector too
    settled = wait_until(lambda: merges_settled(probe), 240, "no merge run pending, running or due")
    before = len(merged_ids(probe, store_url))
    code = f"""
import json
from flows.hospital_finetune import hospital_finetune
from medvec.config import load_params
p = load_params("params.yaml", {json.dumps([o for o in OVERRIDES])})
s = hospital_finetune("h3", {str(tmp / "hospitals" / "h1")!r}, {store_url!r}, params=p.model_dump(mode="json"), emit=False, progress=False)
print(json.dumps(s))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vid = json.loads(proc.stdout.strip().splitlines()[-1])["vector_id"]
    time.sleep(5)
    merged = merged_ids(probe, store_url)
    assert len(merged) == before and not any(vid in m for m in merged), (
        "a merge ran without an event",
        [r for r in api(probe, MERGE_RUNS)["runs"] if r["id"] not in {s["id"] for s in settled}],
    )
    # the reconciling schedule's run (started here instead of waiting an hour) merges it
    run = api(
        probe,
        """
from prefect.deployments import run_deployment
r = run_deployment("merge-and-evaluate/coordinator", timeout=240)
print(json.dumps({"state": r.state.type.value}))
""",
        timeout=300,
    )
    assert run["state"] == "COMPLETED"
    assert any(vid in m for m in merged_ids(probe, store_url))


def test_six_vectors_landing_within_a_second_end_in_one_merge_of_all(cluster, tiny_base):
    env, tmp, store_url, probe = cluster["env"], cluster["tmp"], cluster["store_url"], cluster["probe"]
    code = f"""
import json, time
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.hospital.local import LocalData
from medvec.hospital.finetune import finetune_vector
from medvec.store import open_store
from flows.events import emit_vector_landed
p = load_params("params.yaml", {json.dumps(OVERRIDES)} + ["finetune.epochs=1"])
store = open_store({store_url!r})
base = store.get_base(store.current_base())
write_hospital_shards({str(BREAST)!r}, {str(tmp / "six")!r}, hospitals=6, alpha=1.0, seed=2)
vectors = [finetune_vector(base, f"s{{i}}", LocalData.load({str(tmp / "six")!r} + f"/h{{i}}"), p.finetune, progress=False)[0] for i in range(1, 7)]
def land(v):  # six hospitals publishing at the same moment
    key = store.put(v)
    emit_vector_landed({{"vector_id": v.meta.vector_id, "hospital": v.meta.hospital, "base_sha256": v.meta.base_sha256, "content_sha256": v.content_sha256, "n_train": v.meta.n_train, "key": key, "store": store.url}})
    return time.monotonic()
from concurrent.futures import ThreadPoolExecutor
from prefect.events import emit_event
emit_event(event="medvec.test.warmup", resource={{"prefect.resource.id": "medvec.test"}})  # connect the events client first
store.sidecars()
t0 = time.monotonic()
with ThreadPoolExecutor(6) as pool:
    done = list(pool.map(land, vectors))
print(json.dumps({{"ids": [v.meta.vector_id for v in vectors], "seconds": max(done) - t0}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    landed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert landed["seconds"] < 1.0, landed
    six = set(landed["ids"])
    final = wait_until(
        lambda: next((m for m in merged_ids(probe, store_url) if six <= set(m)), None),
        240,
        "a merge containing all six",
    )
    assert six <= set(final)
    # through the Prefect API: a completed, trigger-created merge run whose artifact lists all six
    _, run = wait_until(lambda: final_merge_run(probe, sorted(six)), 120, "the API showing a merge of all six")
    assert run["params"]["trigger"]["vector"].split(".", 2)[-1] in six
    merges = merged_ids(probe, store_url)
    assert len({tuple(sorted(m)) for m in merges}) == len(merges), "the same inputs were merged twice"

    def triggered_runs() -> list[dict] | None:
        """The merge runs the automation created for the six events, once there are six (the automation may
        create the last ones after the first run has already merged all six)."""
        info = api(probe, MERGE_RUNS)
        auto = info["automations"][0]
        runs = [
            r
            for r in info["runs"]
            if (r["key"] or "").startswith(f"automation {auto}")
            and r["params"]["trigger"]["vector"].split(".", 2)[-1] in six
        ]
        return runs if len(runs) == 6 else None

    triggered = wait_until(triggered_runs, 120, "every landed event creating a merge run")
    assert len(triggered) == 6, "every landed event created a merge run"
    ended = wait_until(
        lambda: (lambda runs: runs if all(r["state"] in ("COMPLETED", "CANCELLED") for r in runs) else None)(
            [r for r in api(probe, MERGE_RUNS)["runs"] if r["id"] in {t["id"] for t in triggered}]
        ),
        240,
        "all six triggered runs finished",
    )
    # a run that stored its merge cancels the queued runs it already answers, instead of leaving each to find
    # nothing new; the message names the run that answered it
    completed = {r["id"] for r in api(probe, MERGE_RUNS)["runs"] if r["state"] == "COMPLETED"}
    cancelled = [r for r in ended if r["state"] == "CANCELLED"]
    assert any(r["state"] == "COMPLETED" for r in ended), ended
    for r in cancelled:
        assert (r["message"] or "").startswith("superseded by run "), r
        assert r["message"].split()[3].rstrip(":") in completed, r
