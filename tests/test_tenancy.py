"""Attack 1 of issue 24 on real servers: a member of the network tries to run its code on hospital b's worker.

Started here: a real ``prefect server start`` (``servers.PrefectServer``), hospital b joined with ``medvec hospital
join b`` and its medvec worker (``python -m flows.worker``), the coordinator's worker, and, as the control, a plain
``prefect worker start --type process`` worker (what medvec started before) on a pool of its own.  The store is a
local folder.  No mocks.

The server requires Prefect's shared auth string (``PREFECT_SERVER_API_AUTH_STRING``), as ``docs/operators.md``
starts it; an outsider without it gets 401.  The attacker holds exactly what every member holds: the API URL and
that string.  It speaks to the API over HTTP, as ``curl`` would.  Each attack is first shown to work against the process worker (the marker file appears), then
made against b's medvec worker, where the run is refused with its reason in b's log and the marker never appears.
"""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import BREAST, TINY_FLOW
from servers import ROOT, PrefectServer, ProcessWorker, Worker, medvec, wait_until

pytestmark = pytest.mark.integration

TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
OVERRIDES = [*TINY_FLOW, "batchnorm.strategy=average", f"coordinator.eval_data={BREAST}"]


def sets(store_url: str) -> list[str]:
    return [arg for o in [*OVERRIDES, f"store.url={store_url}"] for arg in ("-S", o)]


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
    server = PrefectServer(tmp / "prefect", auth=f"medvec:{secrets.token_urlsafe(16)}")  # as operators.md starts it
    env = server.client_env()
    store_url = str(tmp / "store")
    workers: list[Worker] = []
    try:
        medvec(env, "coordinator", "up", *sets(store_url))
        workers.append(Worker("coordinator", env, tmp))
        from medvec.data.split import write_hospital_shards

        write_hospital_shards(BREAST, tmp / "hospitals", hospitals=2, alpha=1.0, seed=0)
        medvec(env, "hospital", "join", "b", "--data", str(tmp / "hospitals" / "h2"), "--no-worker", *sets(store_url))
        workers.append(Worker("hospital-b", env, tmp))
        attacker = Attacker(server.url, server.auth)
        # the control: Prefect's process worker, as `medvec hospital join` started it before
        workers.append(ProcessWorker("process-control", env, tmp))
        wait_until(lambda: attacker.call("GET", "work_pools/process-control"), 60, "the process worker's pool")
        yield {
            "tmp": tmp,
            "env": env,
            "server": server,
            "store": Path(store_url),
            "attacker": attacker,
            "workers": workers,
        }
    finally:
        for w in workers:
            w.stop()
        server.stop()


def test_without_the_auth_string_the_api_answers_nothing_but_its_health(network):
    outsider = httpx.Client(base_url=network["server"].url + "/", timeout=30)
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


def test_b_s_own_run_completes_on_its_medvec_worker_with_its_pinned_data(network):
    attacker, store = network["attacker"], network["store"]
    run = attacker.run(attacker.deployment_id("hospital-finetune/b"))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    assert run["parameters"] == {}  # the server holds no path of b's: the site file on b's machine does
    (published,) = [json.loads(p.read_text())["meta"] for p in (store / "vectors").rglob("b/*.json")]
    local = json.loads((network["tmp"] / "hospitals" / "h2" / "meta.json").read_text())
    assert published["hospital"] == "b" and published["n_train"] == local["n_train"]  # b's own data, as pinned


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
    before = sorted((network["store"] / "vectors").rglob("*"))
    attacker.call(
        "PATCH", f"deployments/{b}", {"parameters": {"data_dir": str(tmp_path), "store_url": str(evil_store)}}
    )
    try:
        reason = refused(attacker.run(b))
    finally:
        attacker.call("PATCH", f"deployments/{b}", {"parameters": {}})
    assert reason.endswith("parameters set on the server (data_dir, store_url); this site pins its own")
    assert not evil_store.exists() and sorted((network["store"] / "vectors").rglob("*")) == before
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
    attacker, env, tmp = network["attacker"], network["env"], network["tmp"]
    b = attacker.call("GET", "deployments/name/hospital-finetune/b")
    attacker.call("DELETE", f"deployments/{b['id']}")
    flow_id = b["flow_id"]
    fields = {k: b[k] for k in ("name", "work_pool_name", "entrypoint", "parameters", "pull_steps", "job_variables")}
    new = attacker.call("POST", "deployments/", {**fields, "flow_id": flow_id, "enforce_parameter_schema": False})["id"]
    assert "is not the one this site created" in refused(attacker.run(new))
    # another machine (its own site folder) joining as b is refused, with how b itself takes the name back
    other = {**env, "MEDVEC_SITE_DIR": str(tmp / "attacker-sites")}
    cmd = [sys.executable, "-m", "flows.cli", "hospital", "join", "b", "--data", str(BREAST), "--no-worker"]
    proc = subprocess.run(
        [*cmd, *sets(str(network["store"]))], cwd=ROOT, env=other, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and not (tmp / "attacker-sites").exists()
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "hospital-finetune/b already exists on the Prefect server and this machine did not create it "
            f"(no site file {tmp / 'attacker-sites' / 'hospital-b.json'} pins it): if this machine is b, pass --replace"
        )
    )
    # b takes it back: its site file pins the deployment again, stripped of anything the attacker set
    medvec(
        env,
        "hospital",
        "join",
        "b",
        "--data",
        str(tmp / "hospitals" / "h2"),
        "--no-worker",
        "--replace",
        *sets(str(network["store"])),
    )
    site = json.loads((Path(env["MEDVEC_SITE_DIR"]) / "hospital-b.json").read_text())
    assert site["deployment_id"] == new
