"""Images per second of ``medvec predict`` against a bare PyTorch inference loop, and one served request's latency.

The model is the demo's θ_pre (EfficientNet-Lite0 at 64 px, ``params.yaml``), registered through medvec's own
registry code (:func:`medvec.tracking.registry._log_model`) in a scratch MLflow SQLite file, with a threshold.
Both loops score PneumoniaMNIST's test images (624, 28 × 28) on the same threads and batch size:

* **medvec predict**: :func:`medvec.hospital.predict.predict_source` as the CLI runs it: the source read a chunk at
  a time, each batch preprocessed (:mod:`medvec.serving`), scored, labelled at the threshold and written as CSV;
* **bare loop**: ``model(to_tensor(images[i:i + b]))`` under ``torch.no_grad()``, the probabilities kept in memory:
  the same preprocessing and forward pass with nothing around them.

They alternate ``--repeats`` times; the headline ``ratio`` is medvec's median images per second over the bare
loop's (the goal: ≥ 0.9), and ``paired_ratio_median`` the median of each repeat's ratio. ``medvec predict`` as a command (process start, MLflow, loading the model) is timed
once, end to end. Then ``mlflow models serve`` (``--env-manager local``) serves the registered model and the
median latency of ``--requests`` requests of one raw 28 × 28 image (``pixels``) is measured from this process.

    python benchmarks/predict_throughput.py [--repeats 5] [--requests 50] [--threads 2]

Writes ``benchmarks/results/predict_throughput.json`` (headline ``ratio`` and ``served_median_ms``) and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import ROOT, table, write

DATA = ROOT / "data" / "pneumoniamnist.npz"


def register(home: Path, threads: int) -> str:
    """θ_pre registered as ``bench-predict`` (alias champion) in ``home``'s MLflow SQLite file; returns the URI."""
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home / 'mlflow.db'}"
    import mlflow
    from mlflow import MlflowClient

    from medvec.config import load_params
    from medvec.models import create_base
    from medvec.tracking.registry import _log_model

    p = load_params(ROOT / "params.yaml")
    base = create_base(p.model.name, 2, pretrained=p.model.pretrained, image_size=p.model.image_size, seed=0)
    exp = mlflow.create_experiment("bench", artifact_location=(home / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp):
        version = _log_model(base, "bench-predict", 0.5)
    MlflowClient().set_registered_model_alias("bench-predict", "champion", version)
    return "bench-predict@champion"


def bare_loop(model: torch.nn.Module, images: np.ndarray, spec, batch_size: int) -> float:
    """Images per second of preprocessing and the forward pass alone."""
    from medvec.preprocess import to_tensor

    out = []
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(torch.softmax(model(to_tensor(images[i : i + batch_size], spec)), 1))
    return len(images) / (time.perf_counter() - start)


def medvec_loop(registered, batch_size: int, out: Path) -> float:
    """Images per second of medvec predict's scoring of the test split (source, preprocessing, labels, CSV)."""
    from medvec.data.images import DataSpec
    from medvec.hospital.predict import open_source, predict_source

    start = time.perf_counter()
    source = open_source(DATA, "test", DataSpec())
    done = predict_source(registered, source, out, 0.1, torch.device("cpu"), batch_size, progress=False)
    return done.rows / (time.perf_counter() - start)


def command_seconds(ref: str, out: Path, threads: int) -> float:
    """Wall seconds of ``medvec predict`` as a command, process start to exit."""
    env = {**os.environ, "MEDVEC_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "flows.cli", "predict", ref, "--data", str(DATA), "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - start


def served_latencies(ref: str, home: Path, image: np.ndarray, requests: int, threads: int) -> tuple[list[float], float]:
    """Milliseconds of each one-image request to ``mlflow models serve``, and the server's start-up seconds."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name, alias = ref.split("@")
    env = {
        **os.environ,
        "MEDVEC_THREADS": str(threads),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@{alias}", "--env-manager", "local"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = open(home / "serve.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {(home / 'serve.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.25)
        startup = time.perf_counter() - start
        body = json.dumps({"dataframe_split": {"columns": ["pixels"], "data": [[image.tolist()]]}}).encode()
        times = []
        for _ in range(requests + 3):  # the first three warm the server up and are not counted
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/invocations", body, {"Content-Type": "application/json"}
            )
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as r:
                json.loads(r.read())
            times.append((time.perf_counter() - t) * 1000)
        return times[3:], startup
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        log.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    from medvec.data.sources import load_npz
    from medvec.runtime import set_threads
    from medvec.tracking.registered import load_registered

    set_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    ref = register(home, args.threads)
    registered = load_registered(ref)
    images = load_npz(DATA, "test").images
    rows: list[dict] = []
    speed: dict[str, list[float]] = {"bare": [], "medvec predict": []}
    for r in range(args.repeats):
        rows.append(
            {
                "repeat": r,
                "loop": "bare",
                "images_per_s": bare_loop(registered.model, images, registered.spec, args.batch_size),
            }
        )
        rows.append(
            {
                "repeat": r,
                "loop": "medvec predict",
                "images_per_s": medvec_loop(registered, args.batch_size, home / "p.csv"),
            }
        )
    for row in rows:
        speed[row["loop"]].append(row["images_per_s"])
    med = {k: statistics.median(v) for k, v in speed.items()}
    ratio = med["medvec predict"] / med["bare"]
    paired = statistics.median(m / b for m, b in zip(speed["medvec predict"], speed["bare"], strict=True))
    command = command_seconds(ref, home / "cli.csv", args.threads)
    latencies, startup = served_latencies(ref, home, images[0], args.requests, args.threads)
    served = statistics.median(latencies)
    p90 = float(np.percentile(latencies, 90))
    headline = {
        "ratio": round(ratio, 3),
        "paired_ratio_median": round(paired, 3),
        "goal_ratio": 0.9,
        "met": ratio >= 0.9,
        "medvec_images_per_s": round(med["medvec predict"], 1),
        "bare_images_per_s": round(med["bare"], 1),
        "command_seconds": round(command, 2),
        "served_median_ms": round(served, 1),
        "served_p90_ms": round(p90, 1),
        "serve_startup_s": round(startup, 1),
    }
    payload = {
        "headline": headline,
        "settings": {
            **vars(args),
            "images": len(images),
            "model": registered.spec.name,
            "image_size": registered.spec.image_size,
        },
        "rows": rows,
        "served_ms": latencies,
    }
    summary = [
        {"what": "medvec predict (median images/s)", "value": f"{med['medvec predict']:.1f}"},
        {"what": "bare loop (median images/s)", "value": f"{med['bare']:.1f}"},
        {"what": "ratio of the medians (goal ≥ 0.9)", "value": f"{ratio:.3f}"},
        {"what": "median of the per-repeat ratios", "value": f"{paired:.3f}"},
        {"what": f"`medvec predict` command, {len(images)} images, end to end (s)", "value": f"{command:.2f}"},
        {"what": "served: one 28 × 28 image, median latency (ms)", "value": f"{served:.1f}"},
        {"what": "served: 90th percentile (ms)", "value": f"{p90:.1f}"},
        {"what": "mlflow models serve start-up (s)", "value": f"{startup:.1f}"},
    ]
    markdown = "\n".join(
        [
            "# predict_throughput",
            "",
            "`python benchmarks/predict_throughput.py "
            + f"--repeats {args.repeats} --requests {args.requests} --threads {args.threads}`",
            "",
            table(summary, ["what", "value"]),
            "",
            table(
                [{**r, "images_per_s": f"{r['images_per_s']:.1f}"} for r in rows], ["repeat", "loop", "images_per_s"]
            ),
        ]
    )
    write("predict_throughput", payload, markdown)


if __name__ == "__main__":
    main()
