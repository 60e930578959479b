"""What the coordinator publishes is signed, and a hospital that pinned its key trains from nothing else.

The attacks are a member's who holds what a joined hospital holds (the store): it repoints the current base at
a base of its own, signs a pointer with a key of its own, copies a signed document to another place, or adds a
forged champion to the start-point index.  Each is refused with the reason, and nothing is trained or published.
"""

from __future__ import annotations

import json
import os

import pytest

from conftest import TINY_FLOW
from medvec.keys import DocumentSigner, DocumentVerifier, UntrustedDocument, keygen
from medvec.models import create_base
from medvec.store import LocalStore
from servers import run_driver


@pytest.fixture()
def coordinator(tmp_path) -> tuple[DocumentSigner, DocumentVerifier]:
    keygen("coordinator", tmp_path / "keys")
    signer = DocumentSigner.load(tmp_path / "keys" / "coordinator.key")
    return signer, DocumentVerifier.load(tmp_path / "keys" / "coordinator.pub")


@pytest.fixture()
def mallory(tmp_path) -> DocumentSigner:
    keygen("mallory", tmp_path / "mallory")
    return DocumentSigner.load(tmp_path / "mallory" / "mallory.key")


def test_a_signed_document_opens_only_with_the_coordinator_s_key_and_only_where_it_was_published(coordinator, mallory):
    signer, verifier = coordinator
    assert signer.verifier == verifier  # the private key's public half is the pinned one
    doc = {"sha256": "a" * 64, "published_at": "2026-12-05T00:00:00+00:00"}
    envelope = signer.sign("bases/current.json", doc)
    assert verifier.open("bases/current.json", envelope) == doc
    with pytest.raises(UntrustedDocument, match="not signed by the coordinator"):
        verifier.open("bases/current.json", doc)  # unsigned
    with pytest.raises(UntrustedDocument, match="signed by SHA256:"):
        verifier.open("bases/current.json", mallory.sign("bases/current.json", doc))  # another key
    with pytest.raises(UntrustedDocument, match="or changed"):
        verifier.open("starts/x/index.json", envelope)  # a signed document copied to another place
    changed = {**envelope, "doc": {**doc, "sha256": "b" * 64}}
    with pytest.raises(UntrustedDocument, match="or changed"):
        verifier.open("bases/current.json", changed)


def test_a_hospital_that_pinned_the_key_refuses_a_repointed_base_and_a_forged_start_point(
    tmp_path, coordinator, mallory, tiny_base
):
    signer, verifier = coordinator
    published = LocalStore(tmp_path / "store").trusting(signer, verifier)  # the coordinator's view
    published.put_base(tiny_base)
    published.put_start(tiny_base.sha256, tiny_base.with_model(tiny_base.fresh(), tiny_base.sha256), "m1", {})
    hospital = LocalStore(tmp_path / "store").trusting(verifier=verifier)
    assert hospital.current_base() == tiny_base.sha256 and hospital.get_base(tiny_base.sha256).sha256
    assert [p.version for p in hospital.start_points(tiny_base.sha256)] == [0, 1]

    # attack 1: a member publishes a base of its own and points bases/current.json at it (unsigned)
    evil = create_base("tiny_cnn", 2, pretrained=False, seed=666)
    member = LocalStore(tmp_path / "store")  # what the member holds: the store, no key
    member.put_base(evil)
    with pytest.raises(UntrustedDocument, match=r"bases/current\.json is not signed by the coordinator"):
        hospital.current_base()
    with pytest.raises(UntrustedDocument, match=r"bases/current\.json"):  # the coordinator refuses it too
        published.current_base()
    # ... or signs the pointer with its own key
    member.write_json("bases/current.json", mallory.sign("bases/current.json", {"sha256": evil.sha256}))
    with pytest.raises(UntrustedDocument, match="signed by SHA256:"):
        hospital.current_base()

    # attack 2: a forged champion appended to the signed start-point index
    index = f"starts/{tiny_base.sha256}/index.json"
    stored = json.loads((tmp_path / "store" / index).read_text())
    forged = {**stored["doc"][0], "version": 2, "sha256": evil.sha256, "merge_id": "forged"}
    member.write_json(index, {**stored, "doc": [*stored["doc"], forged]})
    with pytest.raises(UntrustedDocument, match=f"{index} is not signed by the coordinator's key"):
        hospital.start_points(tiny_base.sha256)


def test_the_registered_weights_statement_verifies_at_the_weights_sha256(coordinator):
    from medvec.tracking.registry import weights_statement

    signer, verifier = coordinator

    class Record:  # the two fields the statement signs
        merge_id, merged_sha256 = "merge-1", "c" * 64

    statement = weights_statement(signer, Record())  # type: ignore[arg-type]
    assert verifier.open(f"models/{'c' * 64}", statement) == {"merge_id": "merge-1", "sha256": "c" * 64}
    with pytest.raises(UntrustedDocument):
        verifier.open(f"models/{'d' * 64}", statement)


FLOW = """
import json, sys
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.keys import DocumentSigner, coordinator_keys, keygen
from medvec.models import create_base
from medvec.store import open_store
from flows.hospital_finetune import hospital_finetune
from flows.merge_and_evaluate import merge_and_evaluate

tmp, overrides = sys.argv[1], json.loads(sys.argv[2])
data = "data/breastmnist.npz"
keygen("coordinator", tmp + "/keys")
p = load_params(None, [*overrides, f"coordinator.key={tmp}/keys/coordinator.key",
                       f"hospital.coordinator_key={tmp}/keys/coordinator.pub"])
write_hospital_shards(data, tmp + "/h", hospitals=2, alpha=1.0, seed=0)
store = open_store(tmp + "/store").trusting(*coordinator_keys(p.coordinator.key))
base = create_base("tiny_cnn", 2, pretrained=False, seed=0)
store.put_base(base)
out = {"signed": hospital_finetune("h1", tmp + "/h/h1", tmp + "/store", params=p, emit=False, progress=False)["vector_id"]}
store.put_start(base.sha256, base, "m1", {})  # a signed champion v1 (θ_pre's weights will do)
pointer = open(tmp + "/store/bases/current.json").read()
evil = create_base("tiny_cnn", 2, pretrained=False, seed=666)
member = open_store(tmp + "/store")  # what the member holds: the store, no key
member.put_base(evil)  # it repoints the current base (unsigned)

def attempt(run):
    try:
        run()
        return "ran"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

h2 = lambda: hospital_finetune("h2", tmp + "/h/h2", tmp + "/store", params=p, emit=False, progress=False)
out["hospital"] = attempt(h2)
out["coordinator"] = attempt(lambda: merge_and_evaluate(tmp + "/store", data, p))
open(tmp + "/store/bases/current.json", "w").write(pointer)  # the pointer restored; now a forged champion
index = json.load(open(tmp + f"/store/starts/{base.sha256}/index.json"))
forged = {**index["doc"][0], "version": 2, "sha256": evil.sha256, "merge_id": "forged"}
member.write_json(f"starts/{base.sha256}/index.json", {**index, "doc": [*index["doc"], forged]})
out["forged_start"] = attempt(h2)
out["h2_vectors"] = [s["key"] for s in open_store(tmp + "/store").sidecars() if s["meta"]["hospital"] == "h2"]
print(json.dumps(out))
"""


@pytest.mark.integration
def test_real_flows_refuse_a_repointed_base_and_publish_nothing(tmp_path):
    """The hospital's flow (its key pinned) and the coordinator's flow (its key configured) run for real and
    refuse, in one line, a current base the coordinator did not sign; the hospital also refuses a forged
    champion in the start index, and publishes nothing."""
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    overrides = [*TINY_FLOW, "finetune.epochs=1", "registry.enabled=false", "batchnorm.strategy=average"]
    overrides += ["evaluate.where=coordinator"]  # a merge from the coordinator's set: no hospitals to ask here
    out = run_driver(FLOW, tmp_path, overrides, env)
    assert out["signed"].startswith("h1-")  # an honest, signed network trains and publishes
    for side in ("hospital", "coordinator"):
        assert out[side] == (
            "UntrustedDocument: bases/current.json is not signed by the coordinator (its key is SHA256:"
            + out[side].split("SHA256:", 1)[-1]
        ), out[side]
    start = out["forged_start"]
    assert start.startswith("UntrustedDocument: starts/") and "index.json is not signed by the coordinator" in start
    assert "\n" not in start  # one line
    assert out["h2_vectors"] == []  # nothing published


def test_a_refusal_is_not_retried(monkeypatch):
    """Retrying an untrusted document cannot make it trusted: medvec.retry and the tasks' retry condition stop
    at once, while a transient failure is retried."""
    from prefect.states import Failed

    from medvec import retry as retry_module
    from tasks.common import transient

    calls = []
    monkeypatch.setattr(retry_module.time, "sleep", lambda s: calls.append(("sleep", s)))

    def refuse():
        calls.append("try")
        raise UntrustedDocument("bases/current.json is not signed by the coordinator")

    with pytest.raises(UntrustedDocument):
        retry_module.retry(refuse, "read the pointer")
    assert calls == ["try"]
    flaky = iter([OSError("reset"), "ok"])

    def once_flaky():
        value = next(flaky)
        if isinstance(value, Exception):
            raise value
        return value

    assert retry_module.retry(once_flaky, "read") == "ok" and ("sleep", 1.0) in calls
    assert transient(None, None, Failed(data=UntrustedDocument("x"))) is False
    assert transient(None, None, Failed(data=OSError("reset"))) is True
