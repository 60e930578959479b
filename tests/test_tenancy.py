"""Issue 24 on real servers: every attack a member could make on another, on a network set up the way
``docs/operators.md``'s checklist sets it up, from a fresh clone with empty HOMEs.

Started here, all on 127.0.0.1: ``prefect server start`` with an auth string (``servers.PrefectServer``),
SeaweedFS ``weed mini`` with only the coordinator's admin identity in its ``-s3.config`` (hospitals' identities
are added by ``medvec coordinator add-hospital`` through ``weed shell``), ``mlflow server --app-name
basic-auth`` with ``default_permission = NO_PERMISSIONS``, the coordinator's medvec worker, hospitals ``a`` and
``b``, each joined from its own folder with its own kit and its own medvec worker, and, as the control of the
worker attacks, Prefect's own process worker (what medvec started before) on a pool of its own.  No mocks.

The attacker is hospital ``a``: it holds exactly its kit (the Prefect URL and auth string, its own store keys,
its own MLflow user) and speaks HTTP to the Prefect API as ``curl`` would.  Each worker attack is first shown
to run on the process worker (the marker file appears), then refused by b's medvec worker with its reason in
b's log.  Each store and MLflow attack is AccessDenied; a's own reads and writes, made alongside, succeed.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError
from test_docs import medvec_commands

from conftest import BREAST, TINY_FLOW
from servers import (
    MlflowServer,
    PrefectServer,
    ProcessWorker,
    SeaweedS3,
    Worker,
    fresh_clone,
    fresh_env,
    wait_until,
)

pytestmark = pytest.mark.integration

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
VENV = Path(sys.prefix)
CLASSES = '[malignant,"normal, benign"]'  # BreastMNIST's, named at the coordinator, which holds none of its images
SHARDS = {"a": "h1", "b": "h2", "c": "h3"}  # three hospitals, three workers; a and b fine-tune, all three answer


class Party:
    """One machine of the network: its own working folder and environment, running the installed ``medvec``."""

    calls: ClassVar[list[list[str]]] = []  # every medvec command any party ran, for the checklist test

    def __init__(self, name: str, cwd: Path, env: dict):
        self.name, self.cwd, self.env = name, cwd, env
        cwd.mkdir(parents=True, exist_ok=True)

    def medvec(self, *args: str, ok: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [str(VENV / "bin" / "medvec"), *args]
        Party.calls.append(list(args))
        proc = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if ok:
            assert proc.returncode == 0, (
                f"{self.name}: medvec {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def python(self, script: str, *args: str, timeout: float = 600) -> dict:
        """Run a driver script as this party, in its folder and environment; the JSON its last line prints."""
        cmd = [sys.executable, "-c", script, *args]
        proc = subprocess.run(cmd, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"{self.name}: {proc.stderr[-4000:]}"
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def with_kit(self, kit: Path) -> None:
        """Add the ``*.env`` files of a hand-out kit to this party's environment (as ``set -a; . x.env``)."""
        for env_file in sorted(kit.glob("*.env")):
            for line in env_file.read_text().splitlines():
                key, _, value = line.partition("=")
                self.env[key] = shlex.split(value)[0] if value else ""


class Attacker:
    """A member with the Prefect API URL and the server's shared auth string, speaking HTTP to the API."""

    def __init__(self, url: str, auth: str | None):
        headers = {"Authorization": "Basic " + base64.b64encode(auth.encode()).decode()} if auth else {}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/", timeout=30, headers=headers)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        for _ in range(10):  # a busy SQLite server answers 503 now and then; Prefect's own client retries too
            response = self.http.request(method, path, json=body)
            if response.status_code not in (429, 503):
                break
            time.sleep(1)
        assert response.status_code < 300, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else {}

    def deployment(self, pool: str, flow: str = "evil", name: str = "evil", **fields) -> str:
        flow_id = self.call("POST", "flows/", {"name": flow})["id"]
        body = {"name": name, "flow_id": flow_id, "work_pool_name": pool, "entrypoint": "evil.py:evil", **fields}
        return self.call("POST", "deployments/", {"enforce_parameter_schema": False, **body})["id"]

    def run(self, deployment_id: str, **body) -> dict:
        """Start a run of ``deployment_id`` and wait for its final state."""
        run_id = self.call("POST", f"deployments/{deployment_id}/create_flow_run", body)["id"]
        return wait_until(lambda: self._final(run_id), 240, f"flow run {run_id} to finish")

    def _final(self, run_id: str) -> dict | None:
        run = self.call("GET", f"flow_runs/{run_id}")
        return run if run["state"] and run["state"]["type"] in TERMINAL else None

    def deployment_id(self, full_name: str) -> str:
        return self.call("GET", f"deployments/name/{full_name}")["id"]


def shell_step(marker: Path) -> list[dict]:
    script = f"sh -c 'env > {marker}'"
    return [{"prefect.deployments.steps.run_shell_script": {"script": script, "stream_output": False}}]


@pytest.fixture(scope="module")
def network(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tenancy")
    clone = fresh_clone(tmp / "medvec")
    prefect = PrefectServer(tmp / "prefect", auth=f"medvec:{secrets.token_urlsafe(16)}")
    s3 = SeaweedS3(tmp / "s3", identities=True)
    mlflow = MlflowServer(tmp / "mlflow", admin_password=secrets.token_urlsafe(16))
    workers: list[Worker] = []
    try:
        store = f"s3://medvec/net?endpoint_url={s3.endpoint}"
        coordinator = Party(
            "coordinator",
            tmp / "coordinator",
            fresh_env(
                tmp / "home-coordinator",
                PYTHONPATH=str(clone),
                MEDVEC_THREADS="1",
                PREFECT_API_URL=prefect.url,
                PREFECT_API_AUTH_STRING=prefect.auth,
                MLFLOW_TRACKING_URI=mlflow.url,
                MLFLOW_TRACKING_USERNAME=MlflowServer.ADMIN,
                MLFLOW_TRACKING_PASSWORD=mlflow.admin_password,
                **s3.env(),
            ),
        )
        sets = [*(a for o in TINY_FLOW for a in ("-S", o)), "-S", "batchnorm.strategy=average"]
        # the coordinator holds no images (issue 25): the hospitals score every candidate, so it names the classes
        sets += ["-S", f"store.url={store}", "-S", "coordinator.eval_data=null", "-S", f"model.classes={CLASSES}"]
        sets += ["-S", "coordinator.key=keys/coordinator.key", "-S", "intake.keyring=keys/keyring.json"]
        # a round waits 90 s (600 by default): a standby process answers in seconds, one still importing (a round
        # right after another, on 2 busy cores) took up to 50 s here
        sets += ["-S", "evaluate.timeout_s=90", "-S", "contribution.method=off"]  # its rounds: test_hospital_judge
        coordinator.medvec("coordinator", "keygen", "--out", "keys")
        coordinator.medvec("coordinator", "up", *sets)
        workers.append(
            Worker("coordinator", coordinator.env, tmp, coordinator.cwd / ".medvec/sites/coordinator.json", clone)
        )
        from medvec.data.split import write_hospital_shards

        write_hospital_shards(BREAST, tmp / "data", hospitals=3, alpha=1.0, seed=0, local_val_fraction=0.2)
        hospitals, running = {}, {}
        for name, shard in SHARDS.items():
            coordinator.medvec(
                "coordinator", "add-hospital", name, "--kit", "kits", "--seaweedfs-master", s3.master, "--mlflow", *sets
            )
            kit = coordinator.cwd / "kits" / name
            home = fresh_env(tmp / f"home-{name}", PYTHONPATH=str(clone), MEDVEC_THREADS="1")
            hospital = hospitals[name] = Party(name, tmp / name, home)
            hospital.with_kit(kit)
            hospital.kit = kit  # type: ignore[attr-defined]
            hospital.medvec("hospital", "keygen", name, "--out", "keys")
            coordinator.medvec(
                "keyring", "add", name, str(hospital.cwd / "keys" / f"{name}.pub"), "--keyring", "keys/keyring.json"
            )
            hospital.medvec(
                "hospital",
                "join",
                name,
                "--data",
                str(tmp / "data" / shard),
                "--params",
                str(kit / "params.yaml"),
                "--coordinator-key",
                str(kit / "coordinator.pub"),
                "--key",
                f"keys/{name}.key",
                "--no-worker",
            )
            site = hospital.cwd / ".medvec" / "sites" / f"hospital-{name}.json"
            running[name] = Worker(f"hospital-{name}", hospital.env, tmp, site, clone)
            workers.append(running[name])
        attacker = Attacker(prefect.url, hospitals["a"].env["PREFECT_API_AUTH_STRING"])
        # the control: Prefect's process worker, as `medvec hospital join` started it before
        workers.append(ProcessWorker("process-control", hospitals["a"].env, tmp))
        wait_until(lambda: attacker.call("GET", "work_pools/process-control"), 60, "the process worker's pool")
        yield {
            "tmp": tmp,
            "clone": clone,
            "prefect": prefect,
            "s3": s3,
            "mlflow": mlflow,
            "store": store,
            "coordinator": coordinator,
            "hospitals": hospitals,
            "attacker": attacker,
            "sets": sets,
            "workers": running,
        }
    finally:
        for w in workers:
            w.stop()
        for server in (prefect, s3, mlflow):
            server.stop()


def test_without_the_auth_string_the_api_answers_nothing_but_its_health(network):
    outsider = httpx.Client(base_url=network["prefect"].url + "/", timeout=30)
    assert outsider.get("health").status_code == 200
    for method, path in (("POST", "flows/filter"), ("POST", "deployments/filter"), ("GET", "work_pools/hospital-b")):
        assert outsider.request(method, path, json={} if method == "POST" else None).status_code == 401
    wrong = {"Authorization": "Basic " + base64.b64encode(b"medvec:guess").decode()}
    assert outsider.post("deployments/filter", json={}, headers=wrong).status_code == 401


def b_log(network) -> str:
    return (network["tmp"] / "worker-hospital-b.log").read_text()


def refused(run: dict) -> str:
    assert run["state"]["type"] == "FAILED" and run["state"]["name"] == "Refused", run["state"]
    return run["state"]["message"]


def admin_s3(network):
    """The coordinator's own S3 client (the admin identity): what the checks below read the store with."""
    return network["s3"].client()


def published(network, hospital: str) -> list[dict]:
    s3 = admin_s3(network)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="medvec", Prefix="net/vectors/").get("Contents", [])]
    own = [k for k in keys if k.split("/")[3] == hospital and k.endswith(".json")]
    return [json.loads(s3.get_object(Bucket="medvec", Key=k)["Body"].read())["meta"] for k in own]


def registered_inputs(network) -> list[list[str]]:
    """The hospitals of each registered version's inputs, read as the MLflow admin through MLflow's REST API (a
    poll that started a Python importing MLflow cost 5 s of CPU a call, beside the merge it waited for)."""
    env = network["coordinator"].env
    api = env["MLFLOW_TRACKING_URI"].rstrip("/") + "/api/2.0/mlflow/"
    auth = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    with httpx.Client(base_url=api, auth=auth, timeout=30) as mlflow:
        found = mlflow.get("model-versions/search", params={"filter": "name='medvec'"})
        if found.status_code != 200:
            return []
        inputs = []
        for version in found.json().get("model_versions", []):
            run = mlflow.get("runs/get", params={"run_id": version["run_id"]}).json()["run"]
            tags = {t["key"]: t["value"] for t in run["data"].get("tags", [])}
            inputs.append(sorted(i[1] for i in json.loads(tags["medvec.inputs"])))
    return inputs


def merge_records(network) -> list[dict]:
    """Every merge record in the store (the documents the coordinator signed), read as the admin."""
    admin = admin_s3(network)
    keys = [o["Key"] for o in admin.list_objects_v2(Bucket="medvec", Prefix="net/merges/").get("Contents", [])]
    docs = [json.loads(admin.get_object(Bucket="medvec", Key=k)["Body"].read()) for k in keys if k.endswith(".json")]
    return [d["doc"] for d in docs if "merge_id" in d.get("doc", {})]


def registered_record(network, hospitals: list[str]) -> dict | None:
    """The merge record of ``hospitals``' vectors once it names its registration (None before)."""
    found = [r for r in merge_records(network) if sorted(i["hospital"] for i in r["inputs"]) == hospitals]
    return next((r for r in found if r.get("registry")), None)


def n_val(network, *hospitals: str) -> int:
    return sum(json.loads((network["tmp"] / "data" / SHARDS[h] / "meta.json").read_text())["n_val"] for h in hospitals)


def test_three_hospitals_join_two_land_and_the_merge_is_chosen_and_registered_from_all_three_s_answers(network):
    """The hardened network of docs/operators.md, with the coordinator holding no images (issue 25): a and b
    fine-tune and land; each landing triggers a merge whose λ, threshold and gate come from the answers of a, b
    and c (c has no vector, but its worker scores every candidate on its validation split)."""
    coordinator, tmp = network["coordinator"], network["tmp"]
    for name in ("a", "b"):
        out = coordinator.medvec("hospital", "run", name, "--timeout", "240", timeout=300).stdout
        assert "COMPLETED" in out, out
    run = network["attacker"].call("GET", "deployments/name/hospital-finetune/b")
    assert run["parameters"] == {}  # the server holds no path of b's: the site file on b's machine does
    for name in ("a", "b"):
        (meta,) = published(network, name)
        local = json.loads((tmp / "data" / SHARDS[name] / "meta.json").read_text())
        assert meta["n_train"] == local["n_train"]  # each hospital's own data, as its site file pins it
    wait_until(lambda: ["a", "b"] in registered_inputs(network), 300, "a registered merge of a and b")
    record = wait_until(lambda: registered_record(network, ["a", "b"]), 60, "the merge record, registered", every=1)
    assert record["evaluation"]["where"] == "hospitals" and record["eval_set"]["source"] == "hospitals a,b,c"
    # c's answers came from a process its worker's standby process forked, with the imports done once, before
    assert "forked by standby process" in (tmp / "worker-hospital-c.log").read_text()
    scan = next(r for r in record["evaluation"]["rounds"] if r["purpose"] == "scan")
    assert scan["answered"] == ["a", "b", "c"] and scan["absent"] == [] and scan["rejected"] == []
    assert scan["n"] == n_val(network, "a", "b", "c")  # every local validation image counted once, none sent
    assert set(scan["answer_sha256"]) == {"a", "b", "c"} and 0 < record["operating_point"]["threshold"] < 1
    assert record["registry"]["reason"].startswith("pooled val auc ")
    assert [r["purpose"] for r in record["evaluation"]["rounds"]] == ["matrix", "scan"]  # the gate read the scan
    admin = admin_s3(network)  # each hospital's view is written after registration, before latest.json moves
    for name in ("a", "b"):
        prefix = f"net/reports/{name}/"
        wait_until(lambda p=prefix: admin.list_objects_v2(Bucket="medvec", Prefix=p)["KeyCount"], 120, prefix)
    # each hospital logged its fine-tune into its own experiment, under its own user
    report = network["hospitals"]["a"].medvec(
        "hospital", "report", "a", "--params", str(network["hospitals"]["a"].kit / "params.yaml"), "--json"
    )
    doc = json.loads(report.stdout)
    assert [v["status"] for v in doc["vectors"]] == ["landed"] and len(doc["merges"]) >= 1
    assert all(m["others"] is None for m in doc["merges"])  # contribution.share is off: nothing of b's
    assert unrun_checklist_commands() == []  # the network above is the one docs/operators.md sets up


def test_a_shell_pull_step_runs_on_a_process_worker_and_nothing_on_b_s_medvec_worker(network):
    attacker, tmp = network["attacker"], network["tmp"]
    control = tmp / "control-marker"
    run = attacker.run(attacker.deployment("process-control", pull_steps=shell_step(control)))
    assert control.exists() and "PREFECT_API_URL" in control.read_text()  # the attack works on a process worker
    marker = tmp / "b-marker"
    run = attacker.run(attacker.deployment("hospital-b", pull_steps=shell_step(marker)))
    reason = refused(run)
    assert "is not the one this site created" in reason and not marker.exists()
    assert reason in b_log(network)  # the hospital's own log says why


def evil_repository(folder: Path, marker: Path) -> str:
    """A git repository the attacker controls, whose flow writes ``marker``; its file:// URL."""
    folder.mkdir()
    flow = f"from pathlib import Path\nfrom prefect import flow\n\n@flow\ndef evil():\n    Path({str(marker)!r}).write_text('ran')\n"
    (folder / "evil.py").write_text(flow)
    git = ["git", "-c", "user.name=a", "-c", "user.email=a@a", "-C", str(folder)]
    for args in (["init", "-q", "-b", "main"], ["add", "evil.py"], ["commit", "-q", "-m", "evil"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    return f"file://{folder}"


def test_a_deployment_from_a_foreign_repository_runs_on_a_process_worker_and_is_refused_on_b_s(network, tmp_path):
    attacker = network["attacker"]
    control, marker = tmp_path / "control-repo-marker", tmp_path / "repo-marker"
    clone = {"prefect.deployments.steps.git_clone": {"repository": evil_repository(tmp_path / "control", control)}}
    run = attacker.run(attacker.deployment("process-control", name="from-git", pull_steps=[clone]))
    assert run["state"]["type"] == "COMPLETED" and control.read_text() == "ran"  # the attack works there
    clone = {"prefect.deployments.steps.git_clone": {"repository": evil_repository(tmp_path / "repo", marker)}}
    run = attacker.run(attacker.deployment("hospital-b", name="from-git", pull_steps=[clone]))
    assert "is not the one this site created" in refused(run) and not marker.exists()


def test_job_variables_and_a_changed_job_template_run_nothing_on_b_s_worker(network):
    attacker, tmp = network["attacker"], network["tmp"]
    marker = tmp / "command-marker"
    command = {"command": f"sh -c 'touch {marker}'"}
    b = attacker.deployment_id("hospital-finetune/b")
    # a deployment of its own whose job variables set the command
    reason = refused(attacker.run(attacker.deployment("hospital-b", name="cmd", job_variables=command)))
    assert "is not the one this site created" in reason
    # the same job variables on a run of b's own deployment, then on b's deployment itself
    reason = refused(attacker.run(b, job_variables=command))
    assert reason.endswith("job variables were set on the server (command); this worker takes none")
    attacker.call("PATCH", f"deployments/{b}", {"job_variables": command})
    assert "job variables were set on the server (command)" in refused(attacker.run(b))
    attacker.call("PATCH", f"deployments/{b}", {"job_variables": {}})
    # the pool's base job template, which anyone on the API can change
    pool = attacker.call("GET", "work_pools/hospital-b")
    changed = json.loads(json.dumps(pool["base_job_template"]))
    changed["variables"]["properties"]["command"]["default"] = command["command"]
    attacker.call("PATCH", "work_pools/hospital-b", {"base_job_template": changed})
    try:
        assert refused(attacker.run(b)).endswith("pool hospital-b's base job template was changed on the server")
    finally:
        attacker.call("PATCH", "work_pools/hospital-b", {"base_job_template": pool["base_job_template"]})
    assert not marker.exists()


def test_a_patched_data_dir_store_or_pull_step_on_b_s_deployment_has_no_effect(network, tmp_path):
    attacker, tmp = network["attacker"], network["tmp"]
    b = attacker.deployment_id("hospital-finetune/b")
    evil_store = tmp_path / "evil-store"
    before = published(network, "b")
    attacker.call(
        "PATCH", f"deployments/{b}", {"parameters": {"data_dir": str(tmp_path), "store_url": str(evil_store)}}
    )
    try:
        reason = refused(attacker.run(b))
    finally:
        attacker.call("PATCH", f"deployments/{b}", {"parameters": {}})
    assert reason.endswith("parameters set on the server (data_dir, store_url); this site pins its own")
    assert not evil_store.exists() and published(network, "b") == before
    marker = tmp / "patched-marker"
    attacker.call("PATCH", f"deployments/{b}", {"pull_steps": shell_step(marker)})
    try:
        assert "pull steps on the server (run_shell_script)" in refused(attacker.run(b))
    finally:
        attacker.call("PATCH", f"deployments/{b}", {"pull_steps": []})
    attacker.call("PATCH", f"deployments/{b}", {"entrypoint": "evil.py:evil"})
    try:
        assert "entrypoint 'evil.py:evil' was changed on the server" in refused(attacker.run(b))
    finally:
        attacker.call("PATCH", f"deployments/{b}", {"entrypoint": "flows/hospital_finetune.py:hospital_finetune"})
    assert not marker.exists()


def test_the_coordinator_s_worker_refuses_a_shell_pull_step_too(network):
    attacker, marker = network["attacker"], network["tmp"] / "coordinator-marker"
    run = attacker.run(attacker.deployment("coordinator", pull_steps=shell_step(marker)))
    assert "refused by coordinator's medvec worker" in refused(run) and not marker.exists()


def test_a_replaced_deployment_is_refused_and_join_will_not_take_another_hospital_s_name(network):
    attacker, tmp, hospitals = network["attacker"], network["tmp"], network["hospitals"]
    b = attacker.call("GET", "deployments/name/hospital-finetune/b")
    attacker.call("DELETE", f"deployments/{b['id']}")
    flow_id = b["flow_id"]
    fields = {k: b[k] for k in ("name", "work_pool_name", "entrypoint", "parameters", "pull_steps", "job_variables")}
    new = attacker.call("POST", "deployments/", {**fields, "flow_id": flow_id, "enforce_parameter_schema": False})["id"]
    assert "is not the one this site created" in refused(attacker.run(new))
    # a, from its own machine, joining as b is refused, with how b itself takes the name back
    a, b_ = hospitals["a"], hospitals["b"]
    join = ["hospital", "join", "b", "--data", str(tmp / "data" / "h1"), "--params", str(a.kit / "params.yaml")]
    proc = a.medvec(*join, "--no-worker", ok=False)
    assert proc.returncode == 2 and not (a.cwd / ".medvec" / "sites" / "hospital-b.json").exists()
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "hospital-finetune/b already exists on the Prefect server and this machine did not create it "
            f"(no site file {a.cwd / '.medvec' / 'sites' / 'hospital-b.json'} pins it): if this machine is b, pass --replace"
        )
    )
    # b takes it back: its site file pins the deployment again, stripped of anything the attacker set
    b_.medvec(
        "hospital",
        "join",
        "b",
        "--data",
        str(tmp / "data" / "h2"),
        "--params",
        str(b_.kit / "params.yaml"),
        "--coordinator-key",
        str(b_.kit / "coordinator.pub"),
        "--key",
        "keys/b.key",
        "--no-worker",
        "--replace",
    )
    site = json.loads((b_.cwd / ".medvec" / "sites" / "hospital-b.json").read_text())
    assert site["deployment_id"] == new


REPOINT = """
import sys
from medvec.models import create_base
from medvec.store import open_store
store = open_store(sys.argv[1])  # the admin identity: what a leaked write credential, or the store's operator, has
evil = create_base("tiny_cnn", 2, pretrained=False, seed=666)
store.put_base(evil)  # and bases/current.json now points at it, unsigned
print(evil.sha256)
"""


def test_a_repointed_current_base_is_refused_by_b_s_next_fine_tune_and_nothing_is_published(network):
    """a's own keys cannot write ``bases/`` (the store test below); whoever can (a leaked admin credential, the
    store's operator) still cannot make b train a base the coordinator did not sign."""
    coordinator, admin = network["coordinator"], admin_s3(network)
    pointer = "net/bases/current.json"
    honest = admin.get_object(Bucket="medvec", Key=pointer)["Body"].read()
    before = published(network, "b")
    proc = subprocess.run(
        [sys.executable, "-c", REPOINT, network["store"]], env=coordinator.env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    try:
        run = coordinator.medvec("hospital", "run", "b", "--timeout", "240", ok=False, timeout=300)
        assert run.returncode == 1 and "FAILED" in run.stdout, run.stdout
    finally:
        admin.put_object(Bucket="medvec", Key=pointer, Body=honest)
    attacker = network["attacker"]
    b = attacker.deployment_id("hospital-finetune/b")
    body = {"deployments": {"id": {"any_": [b]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 1}
    (last,) = attacker.call("POST", "flow_runs/filter", body)
    assert last["state"]["type"] == "FAILED"
    assert "bases/current.json is not signed by the coordinator" in last["state"]["message"], last["state"]
    assert published(network, "b") == before  # nothing published


MERGE = """
import json, sys
from flows.merge_and_evaluate import merge_and_evaluate
from medvec.config import load_params
p = load_params(None, sys.argv[1:]).with_absolute_paths()
print(json.dumps(merge_and_evaluate(store_url=p.store.url, eval_data=None, params=p, force=True), default=str))
"""


def test_with_c_s_worker_stopped_the_merge_waits_once_and_proceeds_on_the_quorum_of_a_and_b(network):
    """Issue 25's quorum on real servers: c's worker is stopped; a merge asks a, b and c to score its candidates,
    waits 45 s for c once, proceeds on the quorum of 2 of 3 sites, and gates against the champion on the sites
    that scored both, from the scan's answers (the champion is asked beside the scan's candidates)."""
    network["workers"]["c"].stop()
    coordinator = network["coordinator"]
    overrides = [o for o in network["sets"] if o != "-S"]
    out = coordinator.python(MERGE, *overrides, "evaluate.timeout_s=45")  # a and b answer in seconds
    assert sorted(i["hospital"] for i in out["inputs"]) == ["a", "b"]
    admin = admin_s3(network)
    base = admin.get_object(Bucket="medvec", Key="net/bases/current.json")["Body"].read()
    sha = json.loads(base)["doc"]["sha256"]
    body = admin.get_object(Bucket="medvec", Key=f"net/merges/{sha}/{out['merge_id']}.json")["Body"].read()
    record = json.loads(body)["doc"]
    first, *later = rounds = record["evaluation"]["rounds"]
    assert record["evaluation"]["where"] == "hospitals"
    assert first["purpose"] == "matrix"  # each input's own model first: the vote may keep one out
    assert 45 <= first["waited_s"] < 105  # c cost the timeout once...
    assert later and all(r["waited_s"] < 45 and r["absent"] == ["c"] for r in later)  # ...and not again
    scan = next(r for r in rounds if r["purpose"] == "scan")
    assert scan["answered"] == ["a", "b"] and scan["absent"] == ["c"] and scan["quorum_met"]
    assert scan["quorum"] == "quorum 0.5 by sites met: 2 of 3 sites answered"
    assert set(scan["answer_sha256"]) == {"a", "b"} and scan["n"] > 0
    assert [r["purpose"] for r in rounds] == ["matrix", "scan"]  # the champion beside the scan: no gate round
    assert record["eval_set"]["source"] == "hospitals a,b" and 0 < record["operating_point"]["threshold"] < 1
    gate = record["registry"]["reason"]
    assert gate.startswith("pooled val auc ") and "on 2 sites (a, b;" in gate, gate
    assert gate.endswith(f"; round {scan['request_id']}")
    # the cross-site matrix: each input's own model and the merge and champion, at each answering site
    assert set(record["evaluation"]["matrix"]) == {"a", "b", "merged", "champion"}
    assert set(record["evaluation"]["matrix"]["a"]) == {"a", "b"} and record["evaluation"]["flagged"] == {}
    # a sees its own column only: its model, the merge and the champion on its own validation split
    key = f"net/reports/a/{sha}/{out['merge_id']}.json"
    wait_until(lambda: admin.list_objects_v2(Bucket="medvec", Prefix=key)["KeyCount"], 60, key)
    view = json.loads(admin.get_object(Bucket="medvec", Key=key)["Body"].read())["doc"]
    assert set(view["at_your_site"]) == {"yours", "merged", "champion"}


def test_a_cannot_make_b_evaluate_anything_but_a_request_the_coordinator_signed(network):
    attacker = network["attacker"]
    b = attacker.deployment_id("hospital-evaluate/b")
    # a request id the coordinator never published (a cannot write requests/: AccessDenied below)
    run = attacker.run(b, parameters={"request": "eval-forged"})
    assert run["state"]["type"] == "FAILED" and "no evaluation request eval-forged" in run["state"]["message"]
    # anything but a request id, or another parameter, is refused before the flow runs
    assert "is not an evaluation request id" in refused(attacker.run(b, parameters={"request": "../../etc"}))
    reason = refused(attacker.run(b, parameters={"request": "eval-x", "data_dir": "/tmp"}))
    assert reason.endswith("parameters set on the server (data_dir); this site pins its own")


def a_s3(network):
    """Hospital a's S3 client: the keys of its own kit."""
    env = network["hospitals"]["a"].env
    return boto3.client(
        "s3",
        endpoint_url=network["s3"].endpoint,
        region_name="us-east-1",
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )


def denied(call) -> bool:
    try:
        call()
    except ClientError as exc:
        return exc.response["Error"]["Code"] in ("AccessDenied", "403")
    return False


def test_with_its_own_store_keys_a_reaches_nothing_of_b_s_nor_what_the_coordinator_alone_writes(network):
    s3, admin = a_s3(network), admin_s3(network)
    keys = [o["Key"] for o in admin.list_objects_v2(Bucket="medvec", Prefix="net/").get("Contents", [])]
    b_vector = next(k for k in keys if k.startswith("net/vectors/") and "/b/" in k and k.endswith(".safetensors"))
    base = b_vector.split("/")[2]
    record = next(k for k in keys if k.startswith(f"net/merges/{base}/") and k.endswith(".json"))
    b_report = next(k for k in keys if k.startswith("net/reports/b/"))
    body = b"forged"
    attacks = {
        "read b's vector": lambda: s3.get_object(Bucket="medvec", Key=b_vector),
        "overwrite b's vector": lambda: s3.put_object(Bucket="medvec", Key=b_vector, Body=body),
        "delete b's vector": lambda: s3.delete_object(Bucket="medvec", Key=b_vector),
        "write under b's folder": lambda: s3.put_object(Bucket="medvec", Key=f"net/vectors/{base}/b/x.json", Body=body),
        "list every vector": lambda: s3.list_objects_v2(Bucket="medvec", Prefix="net/vectors/"),
        "read a merge record": lambda: s3.get_object(Bucket="medvec", Key=record),
        "read b's report": lambda: s3.get_object(Bucket="medvec", Key=b_report),
        "repoint the current base": lambda: s3.put_object(Bucket="medvec", Key="net/bases/current.json", Body=body),
        "forge a start point": lambda: s3.put_object(Bucket="medvec", Key=f"net/starts/{base}/index.json", Body=body),
        "write a merge record": lambda: s3.put_object(Bucket="medvec", Key=f"net/merges/{base}/latest.json", Body=body),
        "write a merged model": lambda: s3.put_object(Bucket="medvec", Key=f"net/models/{base}/latest.json", Body=body),
        "quarantine b": lambda: s3.put_object(Bucket="medvec", Key="net/quarantine/b/x.reason.json", Body=body),
        "empty the seen list": lambda: s3.put_object(Bucket="medvec", Key="net/intake/seen.json", Body=body),
        # the clock a fresh buffer's timeout counts by lives in intake/seen.json (written by no hospital, above);
        # the server optimizer's state (Adam's second moments of others' steps) is the coordinator's alone
        "read the server optimizer's state": lambda: s3.get_object(
            Bucket="medvec", Key=f"net/merges/{base}/server/v1.safetensors"
        ),
        "forge an EMA champion": lambda: s3.put_object(
            Bucket="medvec", Key=f"net/starts/{base}/v1.ema.safetensors", Body=body
        ),
        "answer as b": lambda: s3.put_object(Bucket="medvec", Key="net/answers/r1/b.json", Body=body),
        "publish an evaluation request": lambda: s3.put_object(Bucket="medvec", Key="net/requests/r1.json", Body=body),
        "publish a candidate": lambda: s3.put_object(Bucket="medvec", Key="net/candidates/r1/x.safetensors", Body=body),
    }
    assert [name for name, call in attacks.items() if not denied(call)] == []
    after = [o["Key"] for o in admin.list_objects_v2(Bucket="medvec", Prefix="net/").get("Contents", [])]
    assert after == keys  # nothing written, nothing deleted
    # what a may do, with the same keys: read what everyone shares and its own folders, write its own vectors
    s3.get_object(Bucket="medvec", Key="net/bases/current.json")
    s3.get_object(Bucket="medvec", Key=f"net/models/{base}/latest.json")
    own = s3.list_objects_v2(Bucket="medvec", Prefix=f"net/vectors/{base}/a/")["Contents"]
    assert own and all("/a/" in o["Key"] for o in own)
    assert s3.list_objects_v2(Bucket="medvec", Prefix="net/reports/a/")["KeyCount"] >= 1
    s3.put_object(Bucket="medvec", Key="net/answers/r1/a.json", Body=b"{}")  # its own answer to a request


def mlflow_as(network, hospital: str, code: str) -> str:
    """Run ``code`` with MLflow as ``hospital``'s user (its kit) and return the last line it prints."""
    env = network["hospitals"][hospital].env
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


MLFLOW_ATTACKS = """
import json
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
c = MlflowClient()
champion = c.get_model_version_by_alias("medvec", "champion")  # READ on the registered model
def denied(call):
    try:
        call()
    except MlflowException as exc:
        return "PERMISSION_DENIED" in str(exc) or "403" in str(exc)
    return False
b_exp = c.get_experiment_by_name  # a's user cannot even look b's experiment up
own = c.get_experiment_by_name("medvec-hospitals/a")
own_runs = c.search_runs([own.experiment_id])
print(json.dumps({
    "champion": champion.version,
    "own_runs": len(own_runs),
    "move the alias": denied(lambda: c.set_registered_model_alias("medvec", "champion", "1")),
    "delete the alias": denied(lambda: c.delete_registered_model_alias("medvec", "champion")),
    "read b's experiment": denied(lambda: b_exp("medvec-hospitals/b")),
    "read b's run": denied(lambda: c.get_run(B_RUN)),
    "edit b's run": denied(lambda: c.set_tag(B_RUN, "medvec.vector_id", "forged")),
    "log into b's experiment": denied(lambda: c.create_run(B_EXP)),
    "read the merge run": denied(lambda: c.get_run(champion.run_id)),
}))
"""


def test_a_s_mlflow_user_cannot_move_the_alias_nor_read_or_edit_b_s_runs(network):
    coordinator = network["coordinator"]
    code = (
        "import json; from mlflow import MlflowClient; c = MlflowClient(); "
        "e = c.get_experiment_by_name('medvec-hospitals/b'); r = c.search_runs([e.experiment_id])[0]; "
        "print(json.dumps([e.experiment_id, r.info.run_id]))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=coordinator.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    b_exp, b_run = json.loads(proc.stdout.strip().splitlines()[-1])
    result = json.loads(
        mlflow_as(network, "a", MLFLOW_ATTACKS.replace("B_RUN", repr(b_run)).replace("B_EXP", repr(b_exp)))
    )
    assert result.pop("own_runs") >= 1 and result.pop("champion")  # what a may: read its runs and the champion
    assert [attack for attack, was_denied in result.items() if not was_denied] == []


def checklist_commands() -> list[list[str]]:
    """The ``medvec`` commands (argv after ``medvec``) of ``docs/operators.md``'s checklist."""
    text = (Path(__file__).parents[1] / "docs" / "operators.md").read_text()
    checklist = text.split("## Checklist", 1)[1].split("\n## ", 1)[0]
    return [argv for _, argv in medvec_commands(checklist)]


def options(argv: list[str]) -> set[str]:
    """The options of a command line, and each ``-S`` setting's key (``-S store.url``)."""
    settings = {f"-S {value.split('=', 1)[0]}" for flag, value in itertools.pairwise(argv) if flag == "-S"}
    return {w for w in argv if w.startswith("-")} | settings


def unrun_checklist_commands() -> list[str]:
    """The checklist's ``medvec`` commands that no party ran with at least the options the checklist gives
    (``coordinator worker`` and ``hospital worker`` exec the ``python -m flows.worker SITE`` that
    ``servers.Worker`` starts, so they are not counted)."""
    commands = checklist_commands()
    verbs = [c[:2] for c in commands]
    for verb in (["coordinator", "up"], ["coordinator", "add-hospital"], ["hospital", "join"], ["keyring", "add"]):
        assert verb in verbs, f"the checklist lost medvec {' '.join(verb)}"
    missing = []
    for words in commands:
        if words[1] == "worker":
            continue
        if not [c for c in Party.calls if c[:2] == words[:2] and options(words) <= options(c)]:
            missing.append(" ".join(words))
    return missing
