"""Open the MLflow and Prefect UIs on the demo's stores, or screenshot them (``make ui``, ``make ui-check``).

``serve`` starts two real servers and waits for Ctrl-C:

* the MLflow tracking server: ``mlflow server --backend-store-uri sqlite:///.medvec/mlflow.db``;
* the Prefect server: ``prefect server start`` on ``PREFECT_HOME`` (``.medvec/prefect``, where
  ``make demo`` and ``medvec demo`` keep their run history), with an auth string
  (``PREFECT_SERVER_API_AUTH_STRING``, a random one unless set) that its UI asks for once.

``check`` starts the same servers on free ports, finds the champion, its merge run, one
hospital's fine-tune run and the latest demo run with its artifact, and saves a headless
Chromium screenshot of each page under ``reports/ui/`` (Debian's ``chromium`` and
``chromium-driver`` packages, driven by Selenium).  Run it after ``make demo``; it is not
part of ``make test``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
STORE = Path(".medvec")  # the demo's stores, relative to the working directory (the Makefile runs from the root)
OUT = Path("reports") / "ui"
WINDOW = (1600, 1300)
MLFLOW_DISMISS = ("Close", "Expand description")  # the assistant panel; the collapsed run description


@dataclass(frozen=True)
class Page:
    """A page to screenshot: wait for ``expect`` in it, click ``dismiss`` buttons, scroll ``focus`` to the top."""

    url: str
    expect: str
    focus: str | None = None
    dismiss: tuple[str, ...] = ()


@dataclass(frozen=True)
class Servers:
    mlflow: str
    prefect: str
    prefect_auth: str  # PREFECT_SERVER_API_AUTH_STRING: every API call and the UI's login need it

    def prefect_headers(self) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(self.prefect_auth.encode()).decode()}


def auth_string() -> str:
    """The Prefect server's auth string: ``PREFECT_SERVER_API_AUTH_STRING`` when set, else a fresh random one."""
    return os.environ.get("PREFECT_SERVER_API_AUTH_STRING") or f"medvec:{secrets.token_urlsafe(12)}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    """An executable of this Python's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else name


def _wait(url: str, proc: subprocess.Popen, what: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}; its log: {log}\n{log.read_text()[-2000:]}")
        with suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(1)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s; its log: {log}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@contextmanager
def servers(mlflow_port: int, prefect_port: int, logs: Path) -> Iterator[Servers]:
    """The MLflow server on the demo's SQLite store and the Prefect server on its PREFECT_HOME."""
    db = (STORE / "mlflow.db").resolve()
    if not db.exists():
        raise SystemExit(f"{db} does not exist: run `make demo` first")
    home = Path(os.environ.get("PREFECT_HOME", STORE / "prefect")).resolve()
    auth = auth_string()
    env = {
        **os.environ,
        "PREFECT_SERVER_API_AUTH_STRING": auth,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_API_PORT": str(prefect_port),  # the UI asks the API at the port it was served from
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{prefect_port}/api",
    }
    env.pop("PREFECT_API_URL", None)
    logs.mkdir(parents=True, exist_ok=True)
    commands = {
        "mlflow": [
            _bin("mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--host",
            "127.0.0.1",
            "--port",
            str(mlflow_port),
            "--workers",
            "1",
        ],
        "prefect": [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)],
    }
    procs: dict[str, subprocess.Popen] = {}
    try:
        for name, cmd in commands.items():
            log = logs / f"{name}.log"
            procs[name] = subprocess.Popen(
                cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
            )
        urls = Servers(f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{prefect_port}", auth)
        _wait(f"{urls.mlflow}/health", procs["mlflow"], "mlflow server", logs / "mlflow.log")
        _wait(f"{urls.prefect}/api/health", procs["prefect"], "prefect server", logs / "prefect.log")
        yield urls
    finally:
        for proc in procs.values():
            _stop(proc)


def _champion():
    """(registered model name, champion version, its merge run), read from the demo's MLflow store."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(STORE / 'mlflow.db').resolve()}"
    sys.path.insert(0, str(ROOT))
    from mlflow import MlflowClient

    from medvec.config import load_params

    name = load_params("params.yaml" if Path("params.yaml").exists() else None).registry.model_name
    client = MlflowClient()
    version = client.get_model_version_by_alias(name, "champion")
    return name, version, client.get_run(version.run_id)


def merge_inputs(merge) -> tuple[str, list[str]]:
    """A merge run's merge id and its input vector ids, in input order (read from MLflow, not the UI)."""
    return merge.data.tags["medvec.merge_id"], [row[0] for row in json.loads(merge.data.tags["medvec.inputs"])]


def mlflow_pages(ui: str, name: str, champion, merge) -> dict[str, Page]:
    """The champion's model pages, its merge run and one contributing hospital's fine-tune run."""
    from mlflow import MlflowClient

    from medvec.tracking import runs, server

    vector, owner = json.loads(merge.data.tags["medvec.inputs"])[0][:2]
    hospital = runs.find_hospital_run(vector, owner)
    if hospital is None:
        raise SystemExit(f"no hospital run found for vector {vector}")
    merge_url = server.run_link(merge.info.experiment_id, merge.info.run_id)
    hospital_url = server.run_link(MlflowClient().get_run(hospital).info.experiment_id, hospital)
    return {
        "1-registered-model": Page(f"{ui}/#/models/{name}", "champion", dismiss=MLFLOW_DISMISS),
        "2-champion-version": Page(
            f"{ui}/{server.version_link(name, champion.version)}", "Merged by run", dismiss=MLFLOW_DISMISS
        ),
        "3-merge-run": Page(f"{ui}/{merge_url}", "fine-tune run", "Description", MLFLOW_DISMISS),
        "4-hospital-run": Page(f"{ui}/{hospital_url}", "Fine-tune at hospital", "Description", MLFLOW_DISMISS),
    }


def prefect_pages(urls: Servers) -> dict[str, Page]:
    """The latest demo flow run (its logs), its hospital subflow runs and its ``medvec-demo`` artifact."""
    ui, api = urls.prefect, httpx.Client(base_url=f"{urls.prefect}/api", headers=urls.prefect_headers(), timeout=30)
    runs = api.post(
        "/flow_runs/filter",
        json={"sort": "START_TIME_DESC", "limit": 50, "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}}},
    ).json()
    flows = {f["id"]: f["name"] for f in api.post("/flows/filter", json={}).json()}
    demo = next((r for r in runs if flows.get(r["flow_id"]) == "medvec-demo"), None)
    if demo is None:
        raise SystemExit("no completed medvec-demo run in this Prefect home: run `make demo` first")
    artifacts = api.post(
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [demo["id"]]}, "key": {"any_": ["medvec-demo"]}}},
    ).json()
    pages = {
        "5-prefect-demo-run": Page(f"{ui}/runs/flow-run/{demo['id']}", demo["name"]),
        "7-prefect-runs": Page(f"{ui}/runs", "hospital-finetune/"),
    }
    if artifacts:
        pages["6-prefect-demo-artifact"] = Page(f"{ui}/artifacts/artifact/{artifacts[0]['id']}", "Registry")
    return pages


def browser(chromedriver: str):
    """Headless Chromium driven by Selenium (Debian's chromium and chromium-driver packages)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument(f"--window-size={WINDOW[0]},{WINDOW[1]}")
    return webdriver.Chrome(service=Service(chromedriver), options=options)


def screenshot(driver, page: Page, png: Path, timeout: float = 60) -> None:
    """Load ``page``, wait until it shows its expected text, tidy it, and save a PNG."""
    from selenium.webdriver.common.by import By

    driver.get("about:blank")  # a hash-only change would not reload a single-page app
    driver.get(page.url)
    _wait_text(driver, page.expect, timeout)
    time.sleep(2)  # late widgets (charts, graphs) settle
    for label in page.dismiss:
        _press(driver, label)
    if page.focus:
        for element in driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{page.focus}']")[:1]:
            driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
            time.sleep(1)
    driver.save_screenshot(str(png))


def log_in_to_prefect(driver, urls: Servers) -> None:
    """Log the browser in to the Prefect UI as its login page does: the auth string, base64, in localStorage."""
    driver.get(urls.prefect)
    token = base64.b64encode(urls.prefect_auth.encode()).decode()
    driver.execute_script("localStorage.setItem('prefect-password', arguments[0])", token)


def _wait_text(driver, text: str, timeout: float = 60, present: bool = True) -> None:
    """Wait until ``text`` is on the page (or, with ``present=False``, no longer is)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout).until(lambda d: (text in d.find_element(By.TAG_NAME, "body").text) == present)
    except TimeoutException:
        what = "did not appear" if present else "did not go"
        raise SystemExit(f"{driver.current_url}: {text!r} {what} within {timeout:.0f} s") from None


def _click_link(driver, text: str, index: int = 0, anything: bool = False) -> None:
    """Click the ``index``-th link (or tab, or button) reading ``text``; follow it into a new tab it opens.

    ``anything``: any element whose own text is ``text`` (a node of the artifact tree).
    """
    from selenium.webdriver.common.by import By

    clickable = "self::a or self::button or @role='tab' or @role='link'"
    xpath = (
        f"//*[normalize-space(text())='{text}']" if anything else f"//*[({clickable}) and normalize-space(.)='{text}']"
    )
    links = [e for e in driver.find_elements(By.XPATH, xpath) if e.is_displayed()]
    if len(links) <= index:
        raise SystemExit(f"{driver.current_url}: no link {index + 1} reading {text!r} ({len(links)} found)")
    before = set(driver.window_handles)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", links[index])
    links[index].click()  # a real click: tabs activate on pointer events, not on a script's click()
    time.sleep(1)
    opened = [h for h in driver.window_handles if h not in before]  # description links open a new tab
    if opened:
        driver.switch_to.window(opened[0])


def _press(driver, label: str) -> None:
    """Click the first button labelled ``label`` (aria-label), if the page has one."""
    from selenium.webdriver.common.by import By

    for button in driver.find_elements(By.XPATH, f"//button[@aria-label='{label}']")[:1]:
        button.click()
        time.sleep(1)


def walk_lineage(driver, version: Page, merge_id: str, vectors: list[str], shot: Path | None = None) -> list[str]:
    """Click from the champion version to its merge run, then to each input's fine-tune run and vector file.

    Follows only links on the pages (no typed URLs after the first); returns the path taken.
    ``shot``: a screenshot of the last vector file in its run's artifacts.
    """
    walked = []
    home = driver.current_window_handle
    for i, vector in enumerate(vectors):
        for handle in driver.window_handles:  # tabs the last walk opened
            if handle != home:
                driver.switch_to.window(handle)
                driver.close()
        driver.switch_to.window(home)
        driver.get("about:blank")
        driver.get(version.url)
        _wait_text(driver, "Merged by run")
        _click_link(driver, merge_id)  # the version's description links its merge run
        _wait_text(driver, "fine-tune run")
        _press(driver, "Expand description")  # as a person would: "Show more" on the collapsed description
        _click_link(driver, "fine-tune run", i)  # one link per input vector, in input order
        _wait_text(driver, f"vector {vector}")
        _click_link(driver, "Artifacts")
        _wait_text(driver, "Fine-tune at hospital", present=False)  # the overview (which names the file) is gone
        _click_link(driver, "vector", anything=True)  # the folder in the artifact tree
        _wait_text(driver, f"{vector}.safetensors")
        if shot:
            driver.save_screenshot(str(shot))
        walked.append(f"version → {merge_id} → fine-tune run {i + 1} ({vector}) → Artifacts → {vector}.safetensors")
    return walked


def check(args: argparse.Namespace) -> int:
    chromedriver = shutil.which(args.chromedriver)
    if chromedriver is None or shutil.which("chromium") is None:
        raise SystemExit("chromium or chromedriver not found: apt-get install chromium chromium-driver")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with servers(free_port(), free_port(), out / "logs") as urls:
        name, champion, merge = _champion()
        pages = mlflow_pages(urls.mlflow, name, champion, merge) | prefect_pages(urls)
        driver = browser(chromedriver)
        try:
            log_in_to_prefect(driver, urls)
            for key, page in sorted(pages.items()):
                png = out / f"{key}.png"
                screenshot(driver, page, png)
                print(f"{png}  <-  {page.url}")
            shot = out / "8-hospital-vector-artifact.png"
            walked = walk_lineage(driver, pages["2-champion-version"], *merge_inputs(merge), shot=shot)
            print("\n".join(["clicked from the champion to every input:", *walked]))
            (out / "walk.txt").write_text("\n".join(walked) + "\n")
        finally:
            driver.quit()
    (out / "pages.json").write_text(json.dumps({k: p.url for k, p in pages.items()}, indent=2))
    return 0


def _sigterm_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # so the servers are stopped on `kill` as on Ctrl-C


def serve(args: argparse.Namespace) -> int:
    with servers(args.mlflow_port, args.prefect_port, STORE / "ui-logs") as urls:
        print(f"MLflow UI:  {urls.mlflow}   (the demo's runs, models and lineage)")
        print(f"Prefect UI: {urls.prefect}   (the demo's flow runs, logs and artifacts)")
        print(f"  its API needs the auth string {urls.prefect_auth!r}: the UI asks for it once")
        print("  (PREFECT_SERVER_API_AUTH_STRING chooses it; clients send it as PREFECT_API_AUTH_STRING)")
        print("Ctrl-C stops both.")
        with suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="start both UIs on the demo's stores until Ctrl-C")
    s.add_argument("--mlflow-port", type=int, default=5000)
    s.add_argument("--prefect-port", type=int, default=4200)
    s.set_defaults(func=serve)
    c = sub.add_parser("check", help="screenshot the lineage pages into reports/ui/")
    c.add_argument("--out", default=str(OUT))
    c.add_argument("--chromedriver", default="chromedriver")
    c.set_defaults(func=check)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
