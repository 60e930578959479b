"""Errors a user can cause end in one line that names the problem, exit status 2, never a traceback.

Each case runs the real ``medvec`` command in a subprocess; ``--debug`` shows the traceback.
The image-folder loader is also tested directly: unreadable files are skipped with a
warning naming them, and a DataError stops the load only past ``max_bad_fraction``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import BREAST, ROOT
from servers import free_port


def medvec(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``medvec ARGS`` from the project root."""
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(tmp_path: Path, **extra: str) -> dict:
    """This process's environment without Prefect or MLflow settings, with an empty HOME and PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(HOME=str(tmp_path / "home"), PREFECT_HOME=str(tmp_path / "prefect"), **extra)
    return env


def assert_one_line_error(proc: subprocess.CompletedProcess, *names: str) -> str:
    """rc 2, no traceback, and a single ``error:`` line (the last) that contains every one of ``names``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"rc {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
    for name in names:
        assert name in errors[0], f"{name!r} not in {errors[0]!r}"
    return errors[0]


def write_png_folder(
    root: Path, per_class: int = 10, size: int = 8, splits: tuple[str, ...] = ("train",)
) -> list[Path]:
    """``root/<split>/<class>/*.png`` with two classes of random grayscale images; returns the train files."""
    rng = np.random.default_rng(0)
    files = []
    for split in splits:
        for name in ("a", "b"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                f = folder / f"{i:03d}.png"
                Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(f)
                files += [f] if split == "train" else []
    return files


def spoil(files: list[Path]) -> None:
    """Overwrite ``files`` with bytes that are not an image."""
    for f in files:
        f.write_bytes(b"this is not a png\n")


# --------------------------------------------------------------------------- the image-folder loader


def test_loader_skips_an_unreadable_image_with_a_warning(tmp_path):
    from medvec.data.images import DataWarning
    from medvec.data.sources import load_image_folder

    files = write_png_folder(tmp_path, per_class=10)
    spoil(files[3:4])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = load_image_folder(tmp_path, "train")
    skipped = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(skipped) == 1 and str(files[3]) in str(skipped[0].message)
    assert len(data) == 19 and data.label_counts() == [9, 10]
    assert data.images.shape == (19, 8, 8) and data.classes == ["a", "b"]


def test_loader_fails_past_the_bad_fraction(tmp_path):
    from medvec.data.images import DataError, DataSpec
    from medvec.data.sources import load_image_folder

    files = write_png_folder(tmp_path, per_class=10)
    spoil(files[:3])  # 3 of 20 = 15 % > 10 %
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"3 of 20 images could not be read") as exc:
        load_image_folder(tmp_path, "train")
    # the error names no image file (a failed flow run's message reaches the Prefect server); the warnings do
    assert files[0].name not in str(exc.value) and "the warnings name each file" in str(exc.value)
    with pytest.warns(UserWarning):
        assert len(load_image_folder(tmp_path, "train", DataSpec(max_bad_fraction=0.2))) == 17


def test_check_source_names_the_problem(tmp_path):
    from medvec.data.images import DataError
    from medvec.data.sources import check_source

    check_source(BREAST, ("train", "val", "test"))
    with pytest.raises(DataError, match="no such file or folder"):
        check_source(tmp_path / "nothing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        check_source(tmp_path / "junk.npz")
    write_png_folder(tmp_path / "folder", per_class=1)
    with pytest.raises(DataError, match="no split 'val'"):
        check_source(tmp_path / "folder", ("train", "val"))


# --------------------------------------------------------------------------- the command line


def test_demo_with_a_missing_data_file(tmp_path):
    assert_one_line_error(medvec("demo", "--data", "/nonexistent.npz", env=clean_env(tmp_path)), "/nonexistent.npz")


def test_debug_shows_the_traceback(tmp_path):
    proc = medvec("--debug", "demo", "--data", "/nonexistent.npz", env=clean_env(tmp_path))
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


def test_a_bad_setting(tmp_path):
    assert_one_line_error(medvec("demo", "-S", "nosuch.key=1", env=clean_env(tmp_path)), "nosuch")


def test_split_skips_one_unreadable_png_and_fails_on_many(tmp_path):
    files = write_png_folder(tmp_path / "images", per_class=12)
    spoil(files[5:6])
    split = [
        "split",
        str(tmp_path / "images"),
        "-S",
        "split.hospitals=2",
        "-S",
        "split.names=null",
        "-S",
        "split.min_samples=4",
    ]
    ok = medvec(*split, "--out", str(tmp_path / "ok"), env=clean_env(tmp_path))
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert str(files[5]) in ok.stderr and "Traceback" not in ok.stderr
    spoil(files[:6])
    bad = medvec(*split, "--out", str(tmp_path / "bad"), env=clean_env(tmp_path))
    line = assert_one_line_error(bad, "6 of 24 images could not be read", "the warnings name each file")
    assert files[0].name not in line and f"warning: skipped {files[0]}" in bad.stderr


SMALL_DEMO = [
    "--hospitals", "2", "--no-progress", "-S", "model.name=tiny_cnn", "-S", "model.image_size=16",
    "-S", "finetune.epochs=1", "-S", "merge.methods=[sum]", "-S", "batchnorm.strategies=[none]",
    "-S", "batchnorm.strategy=none", "-S", "demo.centralized=false", "-S", "demo.control=false",
    "-S", "registry.enabled=false", "-S", "split.min_samples=4",
]  # fmt: skip


def test_demo_skips_one_unreadable_png_and_fails_on_many(tmp_path):
    files = write_png_folder(tmp_path / "images", per_class=20, size=16, splits=("train", "val", "test"))
    spoil(files[:1])
    demo = ["demo", "--data", str(tmp_path / "images"), *SMALL_DEMO]
    ok = medvec(*demo, "--out", str(tmp_path / "ok"), env=clean_env(tmp_path), timeout=300)
    assert ok.returncode == 0 and "Traceback" not in ok.stderr, ok.stderr[-3000:]
    assert f"warning: skipped {files[0]}: not a readable image" in ok.stderr
    assert (tmp_path / "ok" / "results.json").is_file()
    spoil(files[:5])
    bad = medvec(*demo, "--out", str(tmp_path / "bad"), env=clean_env(tmp_path), timeout=300)
    assert_one_line_error(bad, f"{tmp_path / 'images' / 'train'}: 5 of 40 images could not be read")
    assert f"warning: skipped {files[0]}" in bad.stderr


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """A SQLite tracking store that holds one registered model ``medvec`` (no versions, no aliases)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    code = f"from mlflow import MlflowClient; MlflowClient(tracking_uri={uri!r}).create_registered_model('medvec')"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    return uri


@pytest.mark.parametrize(
    ("ref", "names"),
    [
        ("medvec@nosuchalias", ["medvec@nosuchalias", "no such alias"]),
        ("nosuchmodel@champion", ["nosuchmodel@champion", "no registered model 'nosuchmodel'"]),
    ],
)
def test_lineage_of_an_unknown_reference(tmp_path, mlflow_db, ref, names):
    assert_one_line_error(medvec("lineage", ref, env=clean_env(tmp_path, MLFLOW_TRACKING_URI=mlflow_db)), *names)


KEYRING = ["-S", "intake.keyring=keyring.json"]  # the hospitals sign their answers (evaluate.where: hospitals)
DISTRIBUTED = [
    ["coordinator", "up", "-S", "model.name=tiny_cnn", *KEYRING],
    ["coordinator", "worker"],
    ["hospital", "join", "h1", "--data", str(BREAST)],
    ["hospital", "run", "h1"],
    ["hospital", "schedule", "h1", "--interval", "60"],
]


@pytest.mark.parametrize("args", DISTRIBUTED, ids=lambda a: " ".join(a[:2]))
def test_distributed_commands_with_the_prefect_api_down(tmp_path, args):
    url = f"http://127.0.0.1:{free_port()}/api"
    store = ["-S", f"store.url={tmp_path / 'store'}"] if args[1] in ("up", "join") else []
    proc = medvec(*args, *store, env=clean_env(tmp_path, PREFECT_API_URL=url))
    assert_one_line_error(proc, url, "prefect server start", "PREFECT_API_URL")
    assert not (tmp_path / "store").exists()  # checked before any work


def test_coordinator_up_without_prefect_api_url(tmp_path):
    store = f"store.url={tmp_path / 'store'}"
    proc = medvec("coordinator", "up", "-S", "model.name=tiny_cnn", "-S", store, *KEYRING, env=clean_env(tmp_path))
    assert_one_line_error(proc, "PREFECT_API_URL is not set", "prefect server start")
    assert not (tmp_path / "store").exists()


def test_coordinator_up_without_eval_data_needs_the_hospitals_keyring_and_the_classes(tmp_path):
    """``coordinator.eval_data: null`` is for a coordinator that holds no images (issue 25): the hospitals score
    (``evaluate.where: hospitals``, the default), so it needs their keyring, and the classes from
    ``model.classes`` or ``--num-classes``."""
    base = ["coordinator", "up", "-S", "model.name=tiny_cnn", "-S", f"store.url={tmp_path / 'store'}"]
    base += ["-S", "coordinator.eval_data=null"]
    proc = medvec(*base, "-S", "evaluate.where=coordinator", env=clean_env(tmp_path))
    assert_one_line_error(proc, "no coordinator.eval_data", "evaluate.where: hospitals")
    proc = medvec(*base, env=clean_env(tmp_path))
    assert_one_line_error(proc, "evaluate.where: hospitals (the default) needs intake.keyring", "keyring add")
    proc = medvec(*base, *KEYRING, env=clean_env(tmp_path))
    assert_one_line_error(proc, "model.classes or --num-classes")
    # with the classes, it gets as far as the Prefect server (none here): nothing about images is asked
    proc = medvec(*base, *KEYRING, "-S", "model.classes=[normal,pneumonia]", env=clean_env(tmp_path))
    assert_one_line_error(proc, "PREFECT_API_URL is not set")
    assert not (tmp_path / "store").exists()


def test_a_reader_that_closes_the_pipe_early_is_not_an_error(tmp_path):
    """``medvec methods | head``: when the reader has gone, the command ends quietly with status 0."""
    read, write = os.pipe()
    os.close(read)  # every write to stdout now fails with EPIPE
    try:
        cmd = [sys.executable, "-m", "flows.cli", "methods"]
        proc = subprocess.run(cmd, cwd=ROOT, stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


def test_medvec_demo_keeps_its_run_history_where_make_demo_does(tmp_path, monkeypatch):
    from flows.cli import _demo_prefect_home, build_parser

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PREFECT_HOME", "unset")  # recorded, so the test's own setting is undone afterwards
    monkeypatch.delenv("PREFECT_HOME")
    _demo_prefect_home(build_parser().parse_args(["methods"]))
    assert "PREFECT_HOME" not in os.environ  # only the demo picks a home
    _demo_prefect_home(build_parser().parse_args(["demo"]))
    assert os.environ["PREFECT_HOME"] == str(tmp_path / ".medvec" / "prefect")  # the Makefile's PREFECT_HOME
    monkeypatch.setenv("PREFECT_HOME", "/elsewhere")
    _demo_prefect_home(build_parser().parse_args(["demo"]))
    assert os.environ["PREFECT_HOME"] == "/elsewhere"  # a home the user set wins


def test_the_demo_s_landings_flag_and_its_deprecated_name(capsys, tmp_path):
    """``--landings-per-hospital C``; the old ``--contributions C`` still works for a release, and says so; the
    demo's params are read once, with ``--hospitals`` and ``--seed`` as overrides."""
    from flows.cli import _demo_params, build_parser

    args = build_parser().parse_args(["demo", "--landings-per-hospital", "3"])
    assert args.landings == 3 and capsys.readouterr().err == ""
    old = build_parser().parse_args(["demo", "--contributions", "2", "--hospitals", "5", "--seed", "7"])
    assert old.landings == 2
    assert "--contributions is deprecated" in capsys.readouterr().err
    assert build_parser().parse_args(["demo"]).landings is None
    old.params = str(tmp_path / "none.yaml")  # no file: the defaults
    p = _demo_params(old)
    assert (p.split.hospitals, p.split.names, p.finetune.seed, p.merge.seed) == (5, None, 7, 7)


def test_key_commands_never_overwrite_replace_or_trust_silently(tmp_path):
    """keygen twice, a second key for a hospital without --replace, a missing keyring: each one error line.
    keyring remove revokes; keyring list shows every fingerprint and each revocation with its reason."""
    keys, ring = tmp_path / "keys", str(tmp_path / "keyring.json")
    made = medvec("hospital", "keygen", "h1", "--out", str(keys))
    assert made.returncode == 0 and "fingerprint SHA256:" in made.stdout, made.stderr
    assert_one_line_error(medvec("hospital", "keygen", "h1", "--out", str(keys)), "never overwrites", "h1.key")
    assert medvec("keyring", "add", "h1", str(keys / "h1.pub"), "--keyring", ring).returncode == 0
    assert medvec("hospital", "keygen", "h1", "--out", str(tmp_path / "new")).returncode == 0
    again = medvec("keyring", "add", "h1", str(tmp_path / "new" / "h1.pub"), "--keyring", ring)
    assert_one_line_error(again, "already has key", "--replace")
    assert_one_line_error(medvec("keyring", "list", "--keyring", str(tmp_path / "none.json")), "no keyring there")
    removed = medvec("keyring", "remove", "h1", "--keyring", ring, "--reason", "left the network")
    assert removed.returncode == 0 and "revoked" in removed.stdout, removed.stderr
    listed = medvec("keyring", "list", "--keyring", ring).stdout
    assert "revoked" in listed and "left the network" in listed


def test_join_with_a_pinned_coordinator_key_refuses_an_unsigned_base_before_any_server(tmp_path, tiny_base):
    """A hospital that pins the coordinator's key does not join a network whose current base that key did not
    sign (here: nobody signed it); one error line, and no server is asked."""
    from medvec.store import LocalStore

    LocalStore(tmp_path / "store").put_base(tiny_base)
    assert medvec("coordinator", "keygen", "--out", str(tmp_path / "keys")).returncode == 0
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    join = medvec(
        "hospital", "join", "h1", "--data", str(BREAST), "--no-worker", "--coordinator-key",
        str(tmp_path / "keys" / "coordinator.pub"), "-S", f"store.url={tmp_path / 'store'}", env=env,
    )  # fmt: skip
    assert_one_line_error(join, "bases/current.json is not signed by the coordinator", "SHA256:")
    assert "Prefect" not in join.stderr
