"""The ``medvec`` command (the console script ``medvec = flows.cli:main``).

Every command shares ``--params FILE`` and ``-S key=value`` (any ``params.yaml``
key, dotted).  Commands import what they need when they run, so ``medvec methods``
or ``medvec vectors verify`` start without loading Prefect or MLflow.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import warnings
from pathlib import Path

from medvec.config import ConfigError, Params, load_params
from medvec.errors import ServerUnreachableError, UserError
from medvec.keys import coordinator_keys, pinned_key
from medvec.names import hospital_name

DEMO_PREFECT_HOME = ".medvec/prefect"  # the Makefile's PREFECT_HOME, relative to the working directory
PREFECT_HINT = "start a server (`prefect server start`) or set PREFECT_API_URL to a running one"


def _shared(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml; missing: defaults)")
    p.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a params.yaml key, e.g. -S merge.method=ties",
    )
    return p


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end has closed (poll reports an error on it)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), or stdout is not a file
        return False


def _demo_prefect_home(args: argparse.Namespace) -> None:
    """``medvec demo`` keeps its run history where ``make demo`` does, so ``make ui`` shows either's runs."""
    if getattr(args, "command", None) == "demo":
        os.environ.setdefault("PREFECT_HOME", str(Path(DEMO_PREFECT_HOME).resolve()))


def _make_dirs() -> None:
    """Create PREFECT_HOME with its parents before Prefect needs it (Prefect creates only the leaf)."""
    home = os.environ.get("PREFECT_HOME")
    if not home:
        return
    try:
        Path(home).expanduser().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"PREFECT_HOME={home}: cannot create it ({exc.strerror})") from exc


_PYTHON_FORMATWARNING = warnings.formatwarning


def _format_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line: str | None = None
) -> str:
    """medvec's own warnings (a skipped file, ...) on one line; others as Python prints them."""
    if category.__module__.startswith("medvec."):
        return f"warning: {message}\n"
    return _PYTHON_FORMATWARNING(message, category, filename, lineno, line)


class _NoUserErrorTraceback(logging.Filter):
    """Keep records that carry a UserError off the console: main prints its one line (the API log keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], UserError))


def _quiet_prefect_console(level: int = logging.WARNING) -> None:
    """Quiet Prefect's console handlers: records below ``level`` and UserError tracebacks stay off the terminal.

    Only the console: the run's logs still reach the Prefect API, so the UI's run page shows them.
    """
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    for handler in {h for logger in loggers for h in getattr(logger, "handlers", [])}:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(max(handler.level, level))
            handler.addFilter(_NoUserErrorTraceback())


def require_prefect_api() -> str:
    """Return the Prefect API URL, or raise ServerUnreachableError naming it when it does not answer."""
    import httpx
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if not url:
        raise ServerUnreachableError(f"PREFECT_API_URL is not set: {PREFECT_HINT}, e.g. http://127.0.0.1:4200/api")
    key = settings.api.key.get_secret_value() if settings.api.key else None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        raise ServerUnreachableError(
            f"Prefect API {url} does not answer ({type(exc).__name__}): {PREFECT_HINT}"
        ) from exc
    if response.status_code == 404 or response.status_code >= 500:
        raise ServerUnreachableError(f"Prefect API {url}: /health gave HTTP {response.status_code}: {PREFECT_HINT}")
    return url


def _demo_params(args: argparse.Namespace) -> Params:
    """The demo's parameters, read once: ``params.yaml``, the ``-S`` overrides, then ``--hospitals`` and ``--seed``."""
    extra = list(args.overrides)
    if args.hospitals is not None:
        extra += [f"split.hospitals={args.hospitals}", "split.names=null"]
    if args.seed is not None:
        extra += [f"finetune.seed={args.seed}", f"merge.seed={args.seed}"]
    return load_params(args.params, extra)


def cmd_demo(args: argparse.Namespace) -> int:
    from medvec.data.sources import check_source

    params = _demo_params(args)  # a bad -S or params file fails here, before the flow starts
    check_source(args.data or params.demo.data, ("train", "val", "test"))
    from flows.demo import demo  # lazy: Prefect loads only for the commands that run a flow

    if not args.debug:
        _quiet_prefect_console()  # the table is the console's; the run's logs go to the Prefect API
    result = demo(
        params=params,
        data=args.data,
        out=args.out,
        progress=not args.no_progress,
        landings_per_hospital=args.landings,
        straggler=args.straggler,
    )
    print(result["table"])
    print(f"results: {result['results']}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from medvec.models import BaseMismatchError, create_base, load_base
    from medvec.vectors.checks import load_vector
    from medvec.vectors.format import InvalidVectorError

    try:
        first = load_vector(args.file)  # integrity, format, values
        if args.base and Path(args.base).is_file():
            base = load_base(args.base)
        else:
            name = args.base or first.meta.base_model
            base = create_base(name, first.meta.num_classes, pretrained=True, image_size=None, seed=0)
        vf = load_vector(args.file, base=base.model.state_dict(), base_sha256=base.sha256)
        if args.keyring:
            from medvec.vectors.signing import Keyring, read_header

            Keyring.load(args.keyring).verify(args.file, vf.meta, vf.content_sha256, read_header(args.file))
    except InvalidVectorError as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
    except BaseMismatchError as exc:
        print(f"rejected: base: {exc}", file=sys.stderr)
        return 2
    print("ok")
    print(json.dumps({"content_sha256": vf.content_sha256, **vf.meta.model_dump()}, indent=2))
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from medvec.data.examples import export_manifest
    from medvec.data.sources import check_source

    check_source(args.data, ("train", "val", "test"))
    print(f"manifest: {export_manifest(args.data, args.out, args.format)}")
    return 0


def cmd_data_example(args: argparse.Namespace) -> int:
    from medvec.data.examples import EXAMPLES, write_manifest

    print(f"manifest: {write_manifest(EXAMPLES[args.task](args.data_dir), args.out, args.format)}")
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    from medvec.data.split import split_from_config

    summary = split_from_config(args.data, args.out, _params(args).split)
    for name, meta in summary["hospitals"].items():
        print(f"{name}: n_train={meta['n_train']} labels={meta['train_label_counts']} -> {Path(args.out) / name}")
    return 0


def _params(args: argparse.Namespace) -> Params:
    return load_params(args.params, args.overrides)


def cmd_coordinator_up(args: argparse.Namespace) -> int:
    from medvec.coordinator.judge import keyring_path
    from medvec.data.sources import check_source
    from medvec.models import base_from_config
    from medvec.store import open_store

    p = _params(args)
    if p.evaluate.where == "hospitals":
        keyring_path(p)
    if p.coordinator.eval_data:
        check_source(p.coordinator.eval_data, ("val",))
    elif p.evaluate.where == "coordinator":
        raise ConfigError("no coordinator.eval_data: give one, or let the hospitals score (evaluate.where: hospitals)")
    elif args.num_classes is None and not p.model.classes:
        raise ConfigError("no coordinator.eval_data to read the classes from: set model.classes or --num-classes")
    require_prefect_api()
    from flows.deployments import deploy_coordinator, worker_command  # lazy: front door

    signer, verifier = coordinator_keys(p.coordinator.key)
    store = open_store(p.store.url).trusting(signer, verifier)
    num_classes, classes = args.num_classes, p.model.classes
    if num_classes is None and classes:
        num_classes = len(classes)
    elif num_classes is None and p.coordinator.eval_data:
        from medvec.data.images import DataSpec
        from medvec.data.sources import load_split

        classes = load_split(p.coordinator.eval_data, "val", DataSpec.of(p)).classes
        num_classes = len(classes)
    assert num_classes is not None  # checked above
    base = base_from_config(p.model, num_classes, classes)
    store.put_base(base)
    pinned = p.with_absolute_paths()  # the worker runs in the checkout, not here
    dep, site = deploy_coordinator(
        pinned.store.url,
        pinned.coordinator.eval_data,
        pinned.model_dump(mode="json"),
        pinned.coordinator.calibration_data,
        pinned.coordinator.reconcile_seconds,
    )
    print(f"base {base.sha256} ({base.spec.name}, {base.spec.image_size}px) is current in {store.url}")
    if verifier is not None:
        print(f"signed by the coordinator's key {verifier.fingerprint}: hospitals pin it with --coordinator-key")
    else:
        print("unsigned: set coordinator.key (medvec coordinator keygen) so hospitals can check what they train")
    print(f"deployment merge-and-evaluate/coordinator ({dep}) on pool 'coordinator', triggered by medvec.vector.landed")
    print(f"site file {site}: the merge's parameters, pinned on this machine")
    print("start its worker with: medvec coordinator worker   (or: " + " ".join(worker_command("coordinator")) + ")")
    return 0


def _kit_store(kit, p, name: str, master: str | None) -> None:
    """The hospital's store identity: scoped S3 keys applied on SeaweedFS (``--seaweedfs-master``), and the
    scope as an AWS IAM policy either way."""
    from medvec.coordinator.access import StoreScope, apply_seaweedfs, aws_policy, hospital_grants, seaweedfs_actions

    if not p.store.url.startswith("s3://"):
        kit.notes.append(f"- the store is a folder ({p.store.url}): it has no identities; share it read-only")
        return
    scope, grants = StoreScope.of(p.store.url), hospital_grants(name)
    policy = json.dumps(aws_policy(scope, grants), indent=2) + "\n"
    kit.add_file("store-policy.json", policy, "what your store identity may read, list and write (AWS IAM form)")
    if master is None:
        kit.notes.append("- store keys: the operator creates an IAM identity with store-policy.json and sends its keys")
        return
    access_key, secret = f"medvec-{name}-{secrets.token_hex(4)}", secrets.token_urlsafe(30)
    apply_seaweedfs(master, f"medvec-{name}", access_key, secret, seaweedfs_actions(scope, grants))
    env = {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret}
    env["AWS_DEFAULT_REGION"] = os.environ.get("AWS_DEFAULT_REGION", "us-east-1")
    kit.add_env("store.env", env, "your own store identity (S3 keys), scoped to store-policy.json")


def cmd_coordinator_add_hospital(args: argparse.Namespace) -> int:
    from medvec.coordinator.onboard import Kit, hospital_params, public_key_file, readme

    p = _params(args)
    name = hospital_name(args.name)
    kit = Kit(name)
    kit.add_file("params.yaml", hospital_params(p), "the coordinator's settings: join with --params params.yaml")
    _, verifier = coordinator_keys(p.coordinator.key)
    if verifier is not None:
        kit.add_file(
            "coordinator.pub", public_key_file(verifier), "the coordinator's key: pin it with --coordinator-key"
        )
    _kit_store(kit, p, name, args.seaweedfs_master)
    prefect = {k: os.environ[k] for k in ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING") if os.environ.get(k)}
    if prefect:
        kit.add_env("prefect.env", prefect, "the shared Prefect server and its auth string")
    if args.mlflow:
        from medvec.tracking.access import add_hospital_user

        password = secrets.token_urlsafe(24)
        experiment = add_hospital_user(name, password, p.registry.model_name)
        env = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI", ""), "MLFLOW_TRACKING_USERNAME": name}
        kit.add_env("mlflow.env", {**env, "MLFLOW_TRACKING_PASSWORD": password}, "your own MLflow user")
        print(
            f"MLflow user {name}: EDIT on experiment {experiment} (its fine-tune runs), READ on {p.registry.model_name}"
        )
    fingerprint = verifier.fingerprint if verifier is not None else None
    folder = kit.write(Path(args.kit), readme(kit, fingerprint, p.store.url))
    print(f"kit for {name}: {folder} ({', '.join(sorted(kit.files))}, README.md); hand it over privately")
    if fingerprint:
        print(f"tell {name} the coordinator's fingerprint by another channel: {fingerprint}")
    return 0


def cmd_coordinator_worker(args: argparse.Namespace) -> int:
    require_prefect_api()
    from flows.deployments import COORDINATOR_POOL, start_worker

    start_worker(COORDINATOR_POOL)  # exec: this process becomes the worker


def _data_report(data: str, params):
    from medvec.data.images import DataSpec
    from medvec.hospital.datacheck import check_data

    return check_data(data, DataSpec.of(params), params.split.local_val_fraction, params.split.seed)


def cmd_hospital_check(args: argparse.Namespace) -> int:
    report = _data_report(args.data, _params(args))
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.text())
    return 0 if report.usable else 2


def cmd_hospital_join(args: argparse.Namespace) -> int:
    from medvec.data.images import DataError
    from medvec.hospital.datacheck import against_base
    from medvec.store import current_labels

    hospital_name(args.name)
    if args.coordinator_key:  # pinned: the deployment trains only from what this key signed
        args.overrides = [*args.overrides, f"hospital.coordinator_key={Path(args.coordinator_key).resolve()}"]
    p = _params(args)
    pinned = pinned_key(p.hospital.coordinator_key)
    report = _data_report(args.data, p)  # the same check as `medvec hospital check`, before anything is created
    report = against_base(report, current_labels(p.store.url, pinned))
    if not report.usable:
        print(report.text(), file=sys.stderr)  # the whole check, line by line, then one error line
        raise DataError(f"{args.data}: not usable for joining (the data check above says why)")
    print(f"data check: {sum(s.read for s in report.splits.values())} images read, usable")
    if pinned is not None:
        print(f"coordinator key {pinned.fingerprint}: check it with your operator out of band")
    require_prefect_api()
    from flows.deployments import deploy_hospital, hospital_pool, start_worker, worker_command

    local = p.with_absolute_paths()  # the worker runs in the checkout, not here
    dep, site = deploy_hospital(
        args.name,
        args.data,
        local.store.url,
        local.model_dump(mode="json"),
        cron=args.cron,
        interval=args.interval,
        key_file=args.key,
        replace=args.replace,
    )
    pool = hospital_pool(args.name)
    print(f"deployment hospital-finetune/{args.name} ({dep}) on pool '{pool}': a trigger, with no parameters")
    print(f"site file {site}: data {Path(args.data).resolve()} and every parameter, pinned on this machine")
    if args.no_worker:
        print(f"start its worker with: medvec hospital worker {args.name}   (or: {' '.join(worker_command(pool))})")
        return 0
    start_worker(pool)  # exec: this process becomes the worker


def cmd_hospital_worker(args: argparse.Namespace) -> int:
    require_prefect_api()
    from flows.deployments import hospital_pool, start_worker

    start_worker(hospital_pool(args.name))  # exec: this process becomes the worker


def cmd_hospital_run(args: argparse.Namespace) -> int:
    require_prefect_api()
    from flows.deployments import run_hospital

    run = run_hospital(args.name, timeout=args.timeout)
    state = run.state
    print(f"{run.name}: {state.type.value if state else 'unknown'}")
    return 0 if state is not None and state.is_completed() else 1


def cmd_hospital_schedule(args: argparse.Namespace) -> int:
    require_prefect_api()
    from flows.deployments import set_hospital_schedule

    set_hospital_schedule(args.name, cron=args.cron, interval=args.interval)
    print(
        f"hospital-finetune/{args.name}: schedule set to "
        + (f"cron {args.cron!r}" if args.cron else f"every {args.interval} s" if args.interval else "none")
    )
    return 0


def cmd_hospital_report(args: argparse.Namespace) -> int:
    from medvec.coordinator.hospital_report import hospital_report, report_text
    from medvec.store import open_store

    p = _params(args)
    store = open_store(args.store or p.store.url).trusting(verifier=pinned_key(p.hospital.coordinator_key))
    doc = hospital_report(store, args.name)
    print(json.dumps(doc, indent=2) if args.json else report_text(doc))
    return 0


def _joined_data(name: str) -> str:
    """The data folder a hospital joined with (its site file), for commands that default to it."""
    from flows.deployments import hospital_pool
    from flows.site import Site, site_file

    return str(Site.load(site_file(hospital_pool(name))).parameters["data_dir"])


def cmd_hospital_monitor(args: argparse.Namespace) -> int:
    from medvec.data.images import DataError
    from medvec.hospital.local import LocalData
    from medvec.hospital.monitor import compare, profile, report_text
    from medvec.hospital.predict import model_data_spec, open_source, set_source
    from medvec.runtime import pick_device, set_threads
    from medvec.tracking.registered import load_registered
    from medvec.tracking.runs import log_monitor

    p = _params(args)
    set_threads(p.finetune.threads)
    model = load_registered(_model_ref(args))
    spec, device = model_data_spec(p, model), pick_device(args.device)
    reference = args.reference or _joined_data(args.name)
    val = LocalData.load(reference, spec, p.split.local_val_fraction, p.split.seed).val
    if val is None:
        raise DataError(f"{reference}: no validation split to compare with (give --reference)")
    ref = profile(model, set_source(val), device, spec.max_bad_fraction, not args.no_progress, "reference")
    new = profile(
        model, open_source(args.data, args.split, spec), device, spec.max_bad_fraction, not args.no_progress, "new"
    )
    report = compare(args.name, f"{model.name}/{model.version}", ref, new)
    print(report_text(report))
    if not args.no_log:
        run_id = log_monitor(report, Path(args.data).name)
        print(f"logged to MLflow run {run_id} (experiment medvec-hospitals/{args.name}): PSI and bin counts only")
    return 0


def cmd_vectors_list(args: argparse.Namespace) -> int:
    from medvec.store import open_store, vector_rows

    p = _params(args)
    rows = vector_rows(open_store(args.store or p.store.url), include_quarantined=args.all)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no vectors")
        return 0
    cols = ["status", "hospital", "vector_id", "n_train", "content", "created_at"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print(
            "  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + (f"  {r['reason']}" if "reason" in r else "")
        )
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from medvec.store import open_store
    from medvec.tracking import lineage

    record = lineage.merge_record(args.ref)
    tree = lineage.add_contributions(lineage.lineage(args.ref), record)
    store = open_store(record.store_url)
    if record.mode == "async":
        from medvec.coordinator.lineage import chain_rows

        tree["chain"] = chain_rows(store, record)
    if args.rebuild:
        tree["rebuild"] = _rebuild(store, record)
    if args.json:
        print(json.dumps(tree, indent=2, default=str))
    else:
        print(lineage.lineage_text(tree))
        for r in tree.get("rebuild", []):
            same = "== registered (identical)" if r["identical"] else f"!= registered {r['registered_sha256']}"
            print(f"rebuilt v{r['version']} from lineage: sha256 {r['sha256']} {same}")
            if "ema_sha256" in r:
                kept = "== stored (identical)" if r["ema_identical"] else "!= stored"
                print(f"rebuilt EMA champion v{r['version']}: sha256 {r['ema_sha256']} {kept}")
    rebuilt = tree.get("rebuild", [])
    return 0 if all(r["identical"] and r.get("ema_identical", True) for r in rebuilt) else 1


def _model_ref(args: argparse.Namespace) -> str:
    """The MODEL argument, or the registered champion of ``registry.model_name``; a bare NAME is its champion."""
    ref = args.model or f"{_params(args).registry.model_name}@champion"
    return ref if "@" in ref or "/" in ref else f"{ref}@champion"


def cmd_predict(args: argparse.Namespace) -> int:
    from medvec.hospital.predict import model_data_spec, open_source, predict_source
    from medvec.runtime import pick_device, set_threads
    from medvec.tracking.registered import load_registered

    p = _params(args)
    set_threads(p.finetune.threads)
    model = load_registered(_model_ref(args))
    spec = model_data_spec(p, model)
    source = open_source(args.data, args.split, spec)
    device = pick_device(args.device)
    out = predict_source(
        model, source, Path(args.out), spec.max_bad_fraction, device, args.batch_size, not args.no_progress
    )
    skipped = f"; skipped {len(out.failed)} unreadable file(s), named above" if out.failed else ""
    print(f"{model.name}/{model.version} on {device.type}: {out.rows} image(s) -> {out.out}{skipped}")
    if out.metrics is not None:
        m = out.metrics
        line = f"auc {m['auc']:.4f}  accuracy {m['accuracy']:.4f}  balanced accuracy {m['balanced_accuracy']:.4f}"
        if "op" in m:
            op = m["op"]
            line += f"  at threshold {op['threshold']:.6g}: sensitivity {op['sensitivity']:.4f}"
            line += f" specificity {op['specificity']:.4f}"
        print(f"{line}  ({m['n']} labelled) -> {out.metrics_path}")
    return 0


def cmd_card(args: argparse.Namespace) -> int:
    from medvec.tracking import lineage
    from medvec.tracking.card import Registration, model_card

    ref = _model_ref(args)
    mv = lineage.resolve(ref)
    print(model_card(lineage.merge_record(ref), Registration.of(mv.name, mv.version, mv.tags)), end="")
    return 0


def _rebuild(store, record) -> list[dict]:
    """Replay a merge (an async champion: its whole chain from θ_pre) and compare each sha256."""
    from medvec.coordinator.lineage import chain, replay_chain

    steps = {r.version or 0: r for r in chain(store, record)}
    rows = []
    for r in replay_chain(store, record):
        row = {"version": r.version, "sha256": r.sha256, "registered_sha256": steps[r.version].merged_sha256}
        row["identical"] = r.identical
        if r.ema_sha256 is not None:
            row |= {"ema_sha256": r.ema_sha256, "ema_identical": r.ema_identical}
        rows.append(row)
    return rows


def _new_passphrase() -> bytes:
    """A passphrase for a new key: ``$MEDVEC_KEY_PASSPHRASE`` when set, else typed twice at the terminal."""
    import getpass

    from medvec.keys import PASSPHRASE_ENV

    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV].encode()
    first = getpass.getpass("passphrase for the new key: ")
    if not first or first != getpass.getpass("again: "):
        raise UserError("the two passphrases differ or are empty: no key written")
    return first.encode()


def cmd_keygen(args: argparse.Namespace) -> int:
    from medvec.keys import PASSPHRASE_ENV, fingerprint, keygen

    coordinator = args.command == "coordinator"
    if not coordinator:
        hospital_name(args.name)
    passphrase = _new_passphrase() if args.passphrase else None
    key, pub = keygen(args.name, args.out, passphrase)
    where = "at the coordinator: -S coordinator.key=" + str(key) if coordinator else "inside the hospital"
    print(f"private key {key} (mode 600, keep it {where})")
    if passphrase:
        print(f"  passphrase-protected: the worker that signs needs {PASSPHRASE_ENV}")
    to = (
        "every hospital: medvec hospital join --coordinator-key"
        if coordinator
        else "the coordinator: medvec keyring add"
    )
    print(f"public key  {pub} (give it to {to})")
    print(f"fingerprint {fingerprint(json.loads(pub.read_text())['public_key'])} (compare it out of band)")
    return 0


def cmd_keyring_add(args: argparse.Namespace) -> int:
    from medvec.vectors.signing import Keyring

    ring = Keyring.load(args.keyring, missing_ok=True)
    print(f"{args.name}: key {ring.add(args.name, args.pubfile, replace=args.replace)}")
    ring.save(args.keyring)
    print(f"{args.keyring}: {len(ring.keys)} hospital(s): {', '.join(sorted(ring.keys))}")
    return 0


def cmd_keyring_remove(args: argparse.Namespace) -> int:
    from medvec.vectors.signing import Keyring

    ring = Keyring.load(args.keyring)
    print(f"{args.name}: key {ring.remove(args.name, args.reason)} revoked; its vectors are refused from now on")
    ring.save(args.keyring)
    return 0


def cmd_keyring_list(args: argparse.Namespace) -> int:
    from medvec.keys import fingerprint
    from medvec.vectors.signing import Keyring

    ring = Keyring.load(args.keyring)
    for name, key in sorted(ring.keys.items()):
        print(f"{name}  {fingerprint(key)}")
    for r in ring.revoked:
        print(f"{r['hospital']}  {fingerprint(r['public_key'])}  revoked {r['revoked_at'][:19]}: {r['reason']}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    from medvec.vectors.format import InvalidVectorError
    from medvec.vectors.signing import sign_file

    try:
        block = sign_file(args.file, args.key)
    except InvalidVectorError as exc:
        print(f"rejected: {exc}", file=sys.stderr)
        return 2
    print(f"signed {args.file} as {block['signer']} (nonce {block['nonce']})")
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from medvec.coordinator.methods import get_method, method_names

    for name in method_names():
        m = get_method(name)
        print(f"{name:16s} {m.formula}   [{m.paper}]  λ grid {list(m.lambdas)}")
    return 0


class _Deprecated(argparse.Action):
    """An old flag name kept for one release: it works as the new one and says so on stderr."""

    def __init__(self, *args, new: str, **kwargs):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"warning: {option_string} is deprecated and goes in the next release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _demo_parser(sub) -> None:
    d = _shared(sub.add_parser("demo", help="run the multi-hospital comparison (embedded Prefect, no server)"))
    d.add_argument("--data", default=None, help=".npz, image-folder root or CSV manifest (default: params demo.data)")
    d.add_argument("--hospitals", type=int, default=None, help="number of simulated hospitals")
    d.add_argument("--out", default=None, help="output folder (default: params demo.out)")
    d.add_argument("--seed", type=int, default=None, help="training seed (fine-tune and DARE)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument(
        "--landings-per-hospital",
        dest="landings",
        type=int,
        default=None,
        metavar="C",
        help="then simulate asynchronous refinement: every hospital lands C more vectors (refine.* settings)",
    )
    d.add_argument(
        "--contributions",
        dest="landings",
        type=int,
        metavar="C",
        action=_Deprecated,
        new="--landings-per-hospital",
        help="deprecated name of --landings-per-hospital",
    )
    d.add_argument(
        "--straggler",
        type=float,
        default=None,
        metavar="X",
        help="with --landings-per-hospital: one hospital X× slower",
    )
    d.set_defaults(func=cmd_demo)


def _data_parser(sub) -> None:
    da = sub.add_parser("data", help="hospital-style data from the shipped MedMNIST files (PNG/DICOM + CSV manifest)")
    dasub = da.add_subparsers(dest="data_command", required=True)
    ex = dasub.add_parser("export", help="every image of an .npz as PNG or DICOM files, with manifest.csv")
    ex.add_argument("--data", required=True, help="a MedMNIST-layout .npz")
    ex.add_argument("--out", required=True)
    ex.add_argument("--format", choices=("png", "dicom"), default="png")
    ex.set_defaults(func=cmd_data_export)
    eg = dasub.add_parser("example", help="a multi-label or 4-class task built from both shipped files")
    eg.add_argument("task", choices=("multilabel", "multiclass"))
    eg.add_argument("--out", required=True)
    eg.add_argument("--format", choices=("png", "dicom"), default="png")
    eg.add_argument("--data-dir", default="data", help="folder holding pneumoniamnist.npz and breastmnist.npz")
    eg.set_defaults(func=cmd_data_example)
    s = _shared(sub.add_parser("split", help="simulate hospitals: one folder per hospital"))
    s.add_argument("data")
    s.add_argument("--out", required=True)
    s.set_defaults(func=cmd_split)


def _vectors_parser(sub) -> None:
    v = sub.add_parser("vectors", help="inspect data vectors")
    vsub = v.add_subparsers(dest="vectors_command", required=True)
    ver = vsub.add_parser("verify", help="validate a vector file; exit 2 on rejection")
    ver.add_argument("file")
    ver.add_argument(
        "--base", default=None, help="base model file (.safetensors) or model name (default: the name in the vector)"
    )
    ver.add_argument("--keyring", default=None, help="require a valid signature by a hospital in this keyring")
    ver.set_defaults(func=cmd_verify)
    sg = vsub.add_parser("sign", help="sign a vector file in place with a hospital's key")
    sg.add_argument("file")
    sg.add_argument("--key", required=True)
    sg.set_defaults(func=cmd_sign)
    vl = _shared(vsub.add_parser("list", help="what has landed in the store"))
    vl.add_argument("--store", default=None, help="store URL (default: params store.url)")
    vl.add_argument("--all", action="store_true", help="include quarantined vectors with their reasons")
    vl.add_argument("--json", action="store_true")
    vl.set_defaults(func=cmd_vectors_list)


def _coordinator_parser(sub) -> None:
    co = sub.add_parser("coordinator", help="the coordinator side of the distributed path (PREFECT_API_URL)")
    cosub = co.add_subparsers(dest="coordinator_command", required=True)
    what = "publish the base, create pool 'coordinator', deploy merge-and-evaluate with its trigger"
    up = _shared(cosub.add_parser("up", help=what))
    up.add_argument("--num-classes", type=int, default=None, help="default: from the evaluation data")
    up.set_defaults(func=cmd_coordinator_up)
    cw = cosub.add_parser("worker", help="start the coordinator's worker in the foreground")
    cw.set_defaults(func=cmd_coordinator_worker)
    ah = _shared(
        cosub.add_parser(
            "add-hospital",
            help="a hospital's store identity, MLflow user and hand-out kit (credentials it alone holds)",
        )
    )
    ah.add_argument("name")
    ah.add_argument("--kit", required=True, metavar="DIR", help="write the kit to DIR/NAME/ (never overwritten)")
    ah.add_argument(
        "--seaweedfs-master",
        default=None,
        metavar="HOST:PORT",
        help="create the store identity on SeaweedFS (weed shell s3.configure); else only its AWS IAM policy",
    )
    ah.add_argument(
        "--mlflow", action="store_true", help="create its MLflow user (a basic-auth server; run as its admin)"
    )
    ah.set_defaults(func=cmd_coordinator_add_hospital)
    ck = cosub.add_parser("keygen", help="write coordinator.key (mode 600) and coordinator.pub; never overwrites")
    ck.add_argument("--out", required=True)
    ck.add_argument("--passphrase", action="store_true", help="encrypt the private key (as hospital keygen does)")
    ck.set_defaults(func=cmd_keygen, name="coordinator")


def _hospital_parser(sub) -> None:
    ho = sub.add_parser("hospital", help="a hospital's side of the distributed path (PREFECT_API_URL)")
    hosub = ho.add_subparsers(dest="hospital_command", required=True)
    what = "create pool hospital-NAME and deployment hospital-finetune/NAME, then start the worker"
    j = _shared(hosub.add_parser("join", help=what))
    j.add_argument("name")
    j.add_argument(
        "--data", required=True, help="this hospital's own data: .npz, image folders or a CSV manifest (PNG/JPEG/DICOM)"
    )
    j.add_argument("--no-worker", action="store_true", help="only print the worker command")
    j.add_argument(
        "--replace",
        action="store_true",
        help="take over hospital-finetune/NAME although another machine created it (this machine is NAME)",
    )
    j.add_argument(
        "--key", default=None, help="this hospital's Ed25519 key (medvec hospital keygen): vectors are signed"
    )
    j.add_argument(
        "--coordinator-key",
        default=None,
        metavar="PUB",
        help="the coordinator's public key (its .pub), pinned: train only from a base and start point it signed",
    )
    _schedule_options(j, required=False)
    j.set_defaults(func=cmd_hospital_join)
    hc = _shared(hosub.add_parser("check", help="read the local data and report what joining would use and publish"))
    hc.add_argument("--data", required=True, help="the data to check: .npz, image folders or a CSV manifest")
    hc.add_argument("--json", action="store_true")
    hc.set_defaults(func=cmd_hospital_check)
    hw = hosub.add_parser("worker", help="start the hospital's medvec worker in the foreground (after join)")
    hw.add_argument("name")
    hw.set_defaults(func=cmd_hospital_worker)
    r = hosub.add_parser("run", help="start the hospital's deployment now and wait for it")
    r.add_argument("name")
    r.add_argument("--timeout", type=float, default=None)
    r.set_defaults(func=cmd_hospital_run)
    kg = hosub.add_parser("keygen", help="write NAME.key (mode 600) and NAME.pub; never overwrites a key")
    kg.add_argument("name")
    kg.add_argument("--out", required=True)
    kg.add_argument(
        "--passphrase",
        action="store_true",
        help="encrypt the private key (passphrase from MEDVEC_KEY_PASSPHRASE, else asked twice)",
    )
    kg.set_defaults(func=cmd_keygen)
    sc = hosub.add_parser("schedule", help="change the retraining schedule")
    sc.add_argument("name")
    _schedule_options(sc, required=True)
    sc.set_defaults(func=cmd_hospital_schedule)
    mo = _shared(hosub.add_parser("monitor", help="drift: the champion's scores and image statistics on new images"))
    mo.add_argument("name")
    mo.add_argument("--data", required=True, help="the new images: any source medvec predict reads")
    mo.add_argument("--reference", default=None, help="data whose validation split is the reference (default: joined)")
    mo.add_argument("--model", default=None, help="NAME@alias or NAME/version (default: the champion)")
    mo.add_argument(
        "--split", default=None, help="the split of --data to read (default: test where there is one, else all)"
    )
    mo.add_argument("--device", default="auto")
    mo.add_argument("--no-log", action="store_true", help="print only; log nothing to MLflow")
    mo.add_argument("--no-progress", action="store_true")
    mo.set_defaults(func=cmd_hospital_monitor)
    hr = _shared(hosub.add_parser("report", help="its vectors, the merges they went into and its contribution to each"))
    hr.add_argument("name")
    hr.add_argument("--store", default=None, help="store URL (default: params store.url)")
    hr.add_argument("--json", action="store_true")
    hr.set_defaults(func=cmd_hospital_report)


def _schedule_options(p: argparse.ArgumentParser, required: bool) -> None:
    when = p.add_mutually_exclusive_group(required=required)
    when.add_argument("--cron", default=None, help="retraining schedule, e.g. '0 2 * * 0'")
    when.add_argument("--interval", type=float, default=None, help="retraining every N seconds")


def _registry_parsers(sub) -> None:
    li = sub.add_parser("lineage", help="model version → merge run → vectors → fine-tune runs → base (MLflow)")
    li.add_argument("ref", help="NAME@ALIAS (e.g. medvec@champion) or NAME/VERSION")
    li.add_argument("--json", action="store_true")
    li.add_argument("--rebuild", action="store_true", help="re-run the merge from its lineage and compare sha256")
    li.set_defaults(func=cmd_lineage)
    kr = sub.add_parser("keyring", help="the coordinator's keyring of allowed hospitals")
    krsub = kr.add_subparsers(dest="keyring_command", required=True)
    ka = krsub.add_parser("add", help="allow a hospital: add its public key")
    ka.add_argument("name")
    ka.add_argument("pubfile")
    ka.add_argument("--keyring", required=True)
    ka.add_argument("--replace", action="store_true", help="replace the hospital's key (the old one is revoked)")
    ka.set_defaults(func=cmd_keyring_add)
    kx = krsub.add_parser("remove", help="revoke a hospital's key: its vectors are refused, with the reason")
    kx.add_argument("name")
    kx.add_argument("--keyring", required=True)
    kx.add_argument("--reason", default="removed", help="recorded with the revocation and shown on refusals")
    kx.set_defaults(func=cmd_keyring_remove)
    kl = krsub.add_parser("list", help="the hospitals' key fingerprints, and the revoked keys")
    kl.add_argument("--keyring", required=True)
    kl.set_defaults(func=cmd_keyring_list)
    pr = _shared(sub.add_parser("predict", help="a registered model's probabilities and labels for local images"))
    pr.add_argument("model", nargs="?", default=None, help="NAME@alias, NAME/version or NAME (default: the champion)")
    pr.add_argument(
        "--data",
        required=True,
        help=".npz, hospital folder, image-folder root, CSV manifest or a folder of PNG/JPEG/DICOM files",
    )
    pr.add_argument("--out", default="predictions.csv", help="the CSV to write (metrics beside it as .metrics.json)")
    pr.add_argument("--split", default=None, help="the split to score (default: test where the data has one, else all)")
    pr.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1 ...")
    pr.add_argument("--batch-size", type=int, default=256)
    pr.add_argument("--no-progress", action="store_true")
    pr.set_defaults(func=cmd_predict)
    ca = _shared(sub.add_parser("card", help="a registered version's model card, built from its merge record"))
    ca.add_argument("model", nargs="?", default=None, help="NAME@alias, NAME/version or NAME (default: the champion)")
    ca.set_defaults(func=cmd_card)
    m = sub.add_parser("methods", help="list merge methods with their formulas")
    m.set_defaults(func=cmd_methods)


def build_parser() -> argparse.ArgumentParser:
    """The ``medvec`` command line: every command and its options."""
    parser = argparse.ArgumentParser(
        prog="medvec", description="Multi-hospital data-vector merging (arXiv 2408.13038)."
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors (default: one line, exit 2)")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_demo_parser, _data_parser, _vectors_parser, _coordinator_parser, _hospital_parser, _registry_parsers):
        add(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (KeyError's quotes removed)."""
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(lines) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one ``medvec`` command; errors a user can fix end in one line and exit status 2."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # medvec prints what it read instead
    warnings.formatwarning = _format_warning
    args = build_parser().parse_args(argv)
    _demo_prefect_home(args)
    try:
        _make_dirs()
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # inside the try: a closed pipe surfaces here
        return code
    except UserError as exc:
        if args.debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        if args.debug or not _stdout_reader_gone():
            raise  # a pipe of ours (a socket, a subprocess) broke: that is an error
        # `medvec methods | head`: the reader of our output left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
