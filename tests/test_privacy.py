"""DP-SGD at the hospital (Opacus): accounted ε, BN frozen, ε signed into the vector, the lifetime budget."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import BREAST, TINY_FLOW, benchmark
from servers import MlflowServer, run_driver


@pytest.fixture(scope="module")
def dp_vector(tiny_base):
    """A DP-SGD fine-tune of the tiny CNN on 200 real breastmnist images (σ solved for ε = 3)."""
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split
    from medvec.hospital.finetune import finetune_vector
    from medvec.hospital.local import LocalData

    train = load_split(BREAST, "train").subset(torch.arange(200).numpy())
    cfg = FinetuneConfig(epochs=2, batch_size=32, lr=0.003, threads=1)
    privacy = PrivacyConfig(
        enabled=True, target_epsilon=3.0, trainable="all", epochs=None, batch_size=None, lr=None, ema=None
    )
    vector, record = finetune_vector(tiny_base, "h1", LocalData(train, None), cfg, progress=False, privacy=privacy)
    return vector, record


def test_the_reported_epsilon_is_exactly_opacus_accounting(dp_vector):
    from opacus.accountants import RDPAccountant

    spent = dp_vector[0].meta.privacy
    assert spent.delta == 1 / (10 * 200) and spent.accountant == "rdp" and spent.batchnorm == "frozen"
    # Opacus' Poisson loader: q = 1/(batches an epoch) = 1/ceil(200/32), and 1/q steps an epoch (empty ones count too)
    assert spent.sample_rate == 1 / 7 and spent.epochs == 2 and spent.steps == 2 * 7
    accountant = RDPAccountant()  # an independent recount from the recorded σ, q, steps and δ
    accountant.history = [(spent.noise_multiplier, spent.sample_rate, spent.steps)]
    assert spent.epsilon == accountant.get_epsilon(spent.delta)
    assert 2.5 < spent.epsilon <= 3.0 + 1e-6  # σ was solved for the target ε over the planned epochs


def test_batch_norm_is_frozen_and_the_rest_is_trained(dp_vector, tiny_base):
    vector = dp_vector[0]
    bn = [k for k in vector.deltas if k.rsplit(".", 1)[0] in vector.running.mean]  # BN layers' weight and bias
    convs = [k for k in vector.deltas if k not in bn]
    assert bn and convs
    assert all(vector.deltas[k].abs().max() == 0 for k in bn)  # affine weights not trained
    assert all(vector.deltas[k].abs().max() > 0 for k in convs)
    base_running = {k: v for k, v in tiny_base.model.state_dict().items() if "running" in k}
    assert vector.running is not None
    for k, mean in vector.running.mean.items():  # running statistics stay θ_pre's: no data in them
        assert torch.equal(mean, base_running[f"{k}.running_mean"])


def test_the_epsilon_is_signed_tampering_fails_verification(dp_vector, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from medvec.keys import keygen
    from medvec.vectors.checks import load_vector
    from medvec.vectors.format import InvalidVectorError
    from medvec.vectors.signing import Keyring, read_header, sign_file

    path = dp_vector[0].save(tmp_path / "v.safetensors")
    key, pub = keygen("h1", tmp_path / "keys")
    sign_file(path, key)
    ring = Keyring()
    ring.add("h1", pub)
    signed = load_vector(path)
    assert signed.meta.privacy.epsilon == dp_vector[0].meta.privacy.epsilon
    ring.verify(path, signed.meta, signed.content_sha256, read_header(path))  # intact: verifies

    with safe_open(str(path), "pt") as f:
        tensors, header = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    meta = json.loads(header["medvec"])
    meta["privacy"]["epsilon"] = 0.1  # claim less privacy spent than was
    header["medvec"] = json.dumps(meta)
    forged = tmp_path / "forged.safetensors"
    save_file(tensors, str(forged), metadata=header)
    v = load_vector(forged)
    with pytest.raises(InvalidVectorError, match="signature does not verify"):
        ring.verify(forged, v.meta, v.content_sha256, read_header(forged))


def test_publishing_past_the_lifetime_budget_is_refused_and_the_vector_kept(dp_vector, tmp_path):
    from medvec.hospital.privacy import Ledger, PrivacyBudgetError

    vector = dp_vector[0]
    eps = vector.meta.privacy.epsilon
    ledger = Ledger(tmp_path / "h1" / "privacy-ledger.json")
    ledger.check(vector, lifetime_epsilon=2 * eps)  # the first fits
    ledger.record(vector)
    assert ledger.spent()[0] == pytest.approx(eps)
    with pytest.raises(PrivacyBudgetError, match=r"privacy.lifetime_epsilon=.* would be exceeded") as err:
        ledger.check(vector, lifetime_epsilon=1.5 * eps)
    kept = tmp_path / "h1" / "unpublished" / f"{vector.meta.vector_id}.safetensors"
    assert kept.is_file() and str(kept) in str(err.value)
    assert json.loads(ledger.path.read_text())["epsilon_total"] == pytest.approx(eps)  # nothing added


SCRIPT = """
import json, sys
from medvec.config import load_params
from medvec.data.split import write_hospital_shards
from medvec.models import create_base
from medvec.hospital.privacy import PrivacyBudgetError
from medvec.store import open_store
from medvec.tracking import lineage
from flows.hospital_finetune import hospital_finetune
from flows.merge_and_evaluate import merge_and_evaluate
tmp, overrides = sys.argv[1], json.loads(sys.argv[2])
p = load_params("params.yaml", overrides)
dp = load_params("params.yaml", overrides + ["privacy.enabled=true", "privacy.target_epsilon=4", "privacy.lifetime_epsilon=6",
                                             "privacy.trainable=bn_affine", "privacy.epochs=2", "privacy.batch_size=64"])
open_store(tmp + "/store").put_base(create_base("tiny_cnn", 2, False, None, 0))
write_hospital_shards(%(data)r, tmp + "/h", hospitals=2, alpha=1.0, seed=0)
out = {"h1": hospital_finetune("h1", tmp + "/h/h1", tmp + "/store", params=dp, emit=False, progress=False),
       "h2": hospital_finetune("h2", tmp + "/h/h2", tmp + "/store", params=p, emit=False, progress=False)}
try:  # a second DP vector from h1 would take it past its lifetime budget
    hospital_finetune("h1", tmp + "/h/h1", tmp + "/store", params=dp, emit=False, progress=False)
    out["refused"] = None
except PrivacyBudgetError as exc:
    out["refused"] = str(exc)
out["merge"] = merge_and_evaluate(tmp + "/store", %(data)r, params=p)
out["vectors"] = [s["meta"]["vector_id"] for s in open_store(tmp + "/store").sidecars()]
# the attack: h2 publishes a full update under h1's partial label (bn_affine, whose ε covers only BN and the head)
import torch
from medvec.vectors.vector import DataVector
store = open_store(tmp + "/store")
h1v = store.get(out["h1"]["vector_id"]).to_vector()
out["h1_keys"] = sorted(h1v.deltas)
forged = dict(h1v.deltas) | {"features.0.weight": torch.full((16, 1, 3, 3), 0.5)}
from medvec.timing import utcnow
meta = h1v.meta.model_copy(update={"hospital": "h2", "vector_id": "h2-20991231T000000000000-forged00", "created_at": utcnow()})
store.put(DataVector(forged, meta, h1v.running))
out["merge2"] = merge_and_evaluate(tmp + "/store", %(data)r, params=p)
out["quarantined"] = [q.model_dump(mode="json") for q in open_store(tmp + "/store").quarantined()]
out["lineage"] = lineage.lineage("medvec@champion")
out["text"] = lineage.lineage_text(out["lineage"])
print(json.dumps(out, default=str))
""" % {"data": str(BREAST)}

OVERRIDES = [
    *TINY_FLOW,
    "merge.method=weighted",
    "merge.lam=1.0",
    f"coordinator.eval_data={BREAST}",
    "evaluate.where=coordinator",  # these tests are of the coordinator's own set; hospitals: test_tenancy
]


@pytest.mark.integration
def test_a_dp_and_a_non_dp_hospital_merge_through_the_flow_and_lineage_shows_each_epsilon(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    try:
        out = run_driver(SCRIPT, tmp_path, OVERRIDES, server.client_env())
    finally:
        server.stop()
    h1, h2 = out["h1"], out["h2"]
    assert h2["privacy"] is None and 0 < h1["privacy"]["epsilon"] <= 4 + 1e-6
    # refused, the budget named, nothing published: the store holds the two vectors, the ledger one ε
    assert "privacy.lifetime_epsilon=6" in out["refused"] and "kept at" in out["refused"]
    assert len(out["vectors"]) == 2
    ledger = json.loads((tmp_path / "h" / "h1" / "privacy-ledger.json").read_text())
    assert [e["vector_id"] for e in ledger["vectors"]] == [h1["vector_id"]]
    assert len(list((tmp_path / "h" / "h1" / "unpublished").glob("*.safetensors"))) == 1
    # the merge took both; lineage shows h1's ε and no ε for h2
    assert sorted(i["vector_id"] for i in out["merge"]["inputs"]) == sorted([h1["vector_id"], h2["vector_id"]])
    eps = {v["hospital"]: v.get("dp_epsilon") for v in out["lineage"]["vectors"]}
    assert eps["h1"] == pytest.approx(h1["privacy"]["epsilon"]) and eps["h2"] is None
    assert f"DP ε={h1['privacy']['epsilon']:.3f}" in out["text"]
    inputs = {i["hospital"]: i for i in out["merge"]["inputs"]}
    assert inputs["h1"]["epsilon"] == pytest.approx(h1["privacy"]["epsilon"]) and inputs["h2"]["epsilon"] is None
    # h1 trained BN scales and shifts and the head only, and sent only those; the merge took the partial vector
    assert h1["privacy"]["trainable"] == "bn_affine"
    bn = [f"features.{i}.{n}" for i in (1, 5, 9, 13) for n in ("weight", "bias")]
    assert out["h1_keys"] == sorted([*bn, "fc.bias", "fc.weight"])
    # the forged vector (a convolution under bn_affine's label) is quarantined with its reason, never merged
    second = out["merge2"]
    assert "h2-20991231T000000000000-forged00" not in [i["vector_id"] for i in second["inputs"]]
    (q,) = [q for q in out["quarantined"] if q["hospital_claimed"] == "h2"]
    assert "forged00" in q["object"]  # kept, with its reason
    assert q["check"] == "extra_key" and "privacy.trainable bn_affine does not train: features.0.weight" in q["problem"]


def test_the_prv_accountant_and_a_fixed_noise_multiplier(tiny_base):
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split
    from medvec.hospital.finetune import finetune_vector
    from medvec.hospital.local import LocalData
    from medvec.hospital.privacy import epsilon_of

    train = load_split(BREAST, "train").subset(torch.arange(120).numpy())
    cfg = FinetuneConfig(epochs=1, batch_size=30, threads=1, augment=False)
    privacy = PrivacyConfig(
        enabled=True, noise_multiplier=1.5, accountant="prv", delta=1e-3, trainable="all", epochs=None, batch_size=None
    )
    vector, _ = finetune_vector(tiny_base, "h2", LocalData(train, None), cfg, progress=False, privacy=privacy)
    spent = vector.meta.privacy
    assert (spent.accountant, spent.noise_multiplier, spent.delta, spent.steps) == ("prv", 1.5, 1e-3, 4)
    assert spent.epsilon == pytest.approx(epsilon_of(spent), rel=1e-6)  # PRV's own recount from the metadata


@pytest.fixture(scope="module")
def partial_vectors(tiny_base):
    """DP-SGD vectors of the tiny CNN on 160 real breastmnist images for each partial privacy.trainable, 3 epochs of
    a logical batch of 64 computed 16 at a time (Opacus' BatchMemoryManager)."""
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split
    from medvec.hospital.finetune import finetune_vector
    from medvec.hospital.local import LocalData

    train = load_split(BREAST, "train").subset(torch.arange(160).numpy())
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=0.003, threads=1)
    out = {}
    for mode in ("head", "bn_affine"):
        privacy = PrivacyConfig(enabled=True, target_epsilon=3.0, trainable=mode, epochs=3, batch_size=64, lr=0.01)
        out[mode] = finetune_vector(tiny_base, "h1", LocalData(train, None), cfg, progress=False, privacy=privacy)[0]
    return out


def test_a_partial_mode_vector_carries_only_what_it_trained(partial_vectors, tiny_base):
    """head: the linear head alone; bn_affine: the four BN layers' scales and shifts and the head. Every tensor it
    carries moved; ε is Opacus' own over the logical steps (q = 64/160 → 1/ceil(160/64) = 1/3, 3 an epoch)."""
    from opacus.accountants import RDPAccountant

    state = tiny_base.model.state_dict()
    head = ["fc.bias", "fc.weight"]
    bn = sorted(f"features.{i}.{n}" for i in (1, 5, 9, 13) for n in ("weight", "bias"))
    assert sorted(partial_vectors["head"].deltas) == head
    assert sorted(partial_vectors["bn_affine"].deltas) == sorted(bn + head)
    for mode, vector in partial_vectors.items():
        assert all(vector.deltas[k].abs().max() > 0 for k in vector.deltas), mode
        assert all(vector.deltas[k].shape == state[k].shape for k in vector.deltas)
        spent = vector.meta.privacy
        assert (spent.trainable, spent.epochs, spent.sample_rate, spent.steps) == (mode, 3, 1 / 3, 9)
        accountant = RDPAccountant()
        accountant.history = [(spent.noise_multiplier, spent.sample_rate, spent.steps)]
        assert spent.epsilon == accountant.get_epsilon(spent.delta) <= 3.0 + 1e-6
    n_sent = sum(v.numel() for v in partial_vectors["bn_affine"].deltas.values())
    assert n_sent == (16 + 32 + 32 + 64) * 2 + 64 * 2 + 2  # the tensors' sizes: what the vector sends


def test_a_partial_vector_verifies_and_merges_with_full_ones_as_zeros(partial_vectors, tiny_base, tmp_path):
    """Loaded against the base, a head vector reads every base key, zeros where it trained nothing; a weighted sum
    with a full vector equals the hand computation, and a DP merge uses it like any other."""
    from conftest import perturbed_state
    from medvec.vectors.checks import load_vector
    from medvec.vectors.file import weighted_sum
    from medvec.vectors.vector import DataVector, vector_keys

    state = tiny_base.model.state_dict()
    partial = load_vector(partial_vectors["head"].save(tmp_path / "head.safetensors"), base=state)
    assert partial.keys() == sorted(vector_keys(state)) and partial.stored_keys == ["fc.bias", "fc.weight"]
    assert partial.tensor("features.0.weight").abs().max() == 0 and partial.fp32_layout() is None
    full = DataVector.from_states(
        state, perturbed_state(state, 1), hospital="h2", base_sha256=tiny_base.sha256, base_model="tiny_cnn",
        num_classes=2, n_train=10, label_counts=[5, 5],
    )  # fmt: skip
    full_file = load_vector(full.save(tmp_path / "full.safetensors"), base=state)
    merged = weighted_sum([partial, full_file], [0.25, 0.75])
    for k in vector_keys(state):
        own = partial_vectors["head"].deltas.get(k, torch.zeros_like(state[k], dtype=torch.float32))
        torch.testing.assert_close(merged.deltas[k], 0.25 * own + 0.75 * full.deltas[k], rtol=0, atol=1e-7)
    assert partial.to_vector().deltas["features.0.weight"].abs().max() == 0


def test_intake_holds_a_partial_vector_to_exactly_the_keys_of_its_signed_mode(partial_vectors, tiny_base, tmp_path):
    """The attacks: a vector that says head but carries a convolution too (a full update under a partial label),
    one that leaves out part of its head, and one without DP that leaves out keys: each refused, naming the key."""
    from medvec.vectors.checks import load_vector
    from medvec.vectors.format import InvalidVectorError
    from medvec.vectors.vector import DataVector

    state = tiny_base.model.state_dict()
    head = partial_vectors["head"]

    def forged(deltas: dict, privacy) -> DataVector:
        meta = head.meta.model_copy(update={"privacy": privacy, "vector_id": f"x-{len(deltas)}-{privacy is None}"})
        return DataVector(deltas, meta)

    extra = {**head.deltas, "features.0.weight": torch.ones_like(state["features.0.weight"])}
    with pytest.raises(
        InvalidVectorError, match=r"1 extra key\(s\) that privacy.trainable head does not train: features\.0\.weight"
    ):
        load_vector(forged(extra, head.meta.privacy).save(tmp_path / "extra.safetensors"), base=state)
    short = {"fc.weight": head.deltas["fc.weight"]}
    with pytest.raises(
        InvalidVectorError, match=r"missing 1 key\(s\) of the base that privacy.trainable head trains: fc.bias"
    ):
        load_vector(forged(short, head.meta.privacy).save(tmp_path / "short.safetensors"), base=state)
    with pytest.raises(InvalidVectorError, match=r"missing \d+ key\(s\) of the base: features"):
        load_vector(forged(dict(head.deltas), None).save(tmp_path / "nodp.safetensors"), base=state)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_frozen_stats_norm_gives_each_example_the_gradient_batch_norm_in_eval_mode_would(tiny_base):
    """Opacus' per-sample gradients of the BN scales and shifts through FrozenStatsNorm equal autograd's gradient
    of the real BatchNorm2d (eval mode) for each example alone."""
    import copy

    from opacus import GradSampleModule

    from medvec.hospital.privacy import frozen_stats_norms, select_trainable

    model = copy.deepcopy(tiny_base.model)
    with torch.no_grad():  # statistics and affine weights away from their defaults
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0), m.weight.uniform_(0.5, 1.5)
    model.eval()
    params = select_trainable(model, "bn_affine")
    x, y = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 1, 0])
    expected = []
    for i in range(4):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        expected.append([p.grad.clone() for p in params])
    with frozen_stats_norms(model):
        private = GradSampleModule(
            model.train(), loss_reduction="sum"
        )  # no batch statistics left: training mode is eval's arithmetic
        model.zero_grad()
        torch.nn.functional.cross_entropy(private(x), y, reduction="sum").backward()
        for i in range(4):
            for p, want in zip(params, expected[i], strict=True):
                torch.testing.assert_close(p.grad_sample[i], want, rtol=1e-4, atol=1e-6)
        private._close()
    assert isinstance(model.features[1], torch.nn.BatchNorm2d)  # put back after the block


def test_tuning_never_reads_a_hospital_s_split(tiny_base, tmp_path):
    """tune_on_public refuses a hospital's own images (LocalData marks them, and subsets and concatenations keep
    the mark); on public data it runs DP-SGD over its grid and ranks the points by held-out AUC."""
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.images import ImageSet
    from medvec.data.sources import load_split
    from medvec.hospital.local import LocalData
    from medvec.hospital.privacy import PrivateDataError, tune_on_public

    cfg = FinetuneConfig(epochs=1, batch_size=16, threads=1)
    privacy = PrivacyConfig(enabled=True, target_epsilon=3.0, trainable="head", epochs=2, batch_size=32)
    local = LocalData.of_splits(load_split(BREAST, "train").subset(torch.arange(80).numpy()), None, True, 0.25, 0)
    for private in (
        local.train,
        local.val,
        local.train.subset([0, 1, 2]),
        ImageSet.concat([load_split(BREAST, "val"), local.val]),
    ):
        with pytest.raises(PrivateDataError, match="a hospital's private split"):
            tune_on_public(private, tiny_base, cfg, privacy)
    public = load_split(BREAST, "val")
    assert not public.private
    grid = tune_on_public(public, tiny_base, cfg, privacy, lrs=(0.01, 0.1), norms=(1.0,), seeds=2)
    assert sorted((g.lr, g.max_grad_norm) for g in grid) == [(0.01, 1.0), (0.1, 1.0)]
    assert grid[0].val_auc >= grid[1].val_auc and all(len(g.val_aucs) == 2 for g in grid)
    assert all(g.val_auc == sum(g.val_aucs) / 2 and all(0 <= a <= 1 for a in g.val_aucs) for g in grid)
    assert grid[0].val_aucs[0] != grid[0].val_aucs[1]  # two splits, two scores: the mean ranks, not one split
    by_epochs = tune_on_public(public, tiny_base, cfg, privacy, lrs=(0.01,), norms=(1.0,), seeds=1, epochs=(1, 4))
    assert sorted(g.epochs for g in by_epochs) == [1, 4]  # type: ignore[type-var]  # both set
    assert by_epochs[0].val_aucs != by_epochs[1].val_aucs  # each point trained for its own epochs


def test_privacy_weight_decay_is_adamw_s_decoupled_decay_of_the_start_weights(tiny_base):
    """One logical step (the whole split, q = 1): Adam's first update, g / (|g| + eps), is the same with and without
    decay (same seed, same noise), so the two heads differ by exactly lr · weight_decay · θ_start."""
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split
    from medvec.hospital.privacy import dp_finetune

    train = load_split(BREAST, "train").subset(torch.arange(64).numpy())
    cfg = FinetuneConfig(epochs=1, batch_size=64, threads=1, weight_decay=0.0)
    common = {"enabled": True, "target_epsilon": 3.0, "trainable": "head", "epochs": 1, "batch_size": 64}
    common |= {"ema": None, "augmentations": 1, "lr": 0.05}
    heads = {}
    for decay in (None, 4.0):  # None: finetune.weight_decay, here 0
        model = tiny_base.fresh()
        dp = dp_finetune(model, train, tiny_base.spec, cfg, PrivacyConfig(**common, weight_decay=decay), progress=False)
        assert dp.spent.steps == 1
        heads[decay] = (model.fc.weight.detach().clone(), model.fc.bias.detach().clone())
    start = tiny_base.fresh().fc
    for trained, plain, before in zip(heads[4.0], heads[None], (start.weight, start.bias), strict=True):
        torch.testing.assert_close(trained - plain, -0.05 * 4.0 * before.detach(), rtol=1e-4, atol=1e-6)
        assert (trained - plain).abs().max() > 1e-3  # the decay moved the head


@pytest.mark.parametrize("mode", ["head", "bn_affine", "all"])
def test_select_trainable_alone_decides_what_trains(tiny_base, mode):
    """Whatever ``requires_grad`` the parameters had, select_trainable sets every one: exactly the keys the vector
    of ``mode`` carries (batch norm's scales and shifts outside bn_affine never); batchnorm_layers changes none."""
    import copy

    from medvec.hospital.privacy import batchnorm_layers, select_trainable
    from medvec.vectors.vector import bn_affine_keys, trained_keys

    state = tiny_base.model.state_dict()
    want = set(trained_keys(state, mode)) - (set(bn_affine_keys(state)) if mode == "all" else set())
    for before in (True, False):
        model = copy.deepcopy(tiny_base.model).requires_grad_(before)
        assert [type(m) for m in batchnorm_layers(model)] == [torch.nn.BatchNorm2d] * 4
        assert all(p.requires_grad is before for p in model.parameters())  # it only lists the layers
        chosen = select_trainable(model, mode)
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want
        assert [id(p) for p in chosen] == [id(p) for n, p in model.named_parameters() if n in want]


@pytest.mark.parametrize("size", [28, 36])  # the images' own size, and a resize (to_tensor interpolates)
def test_head_features_streamed_a_batch_at_a_time_equal_those_of_the_whole_split(tiny_base, size):
    """privacy.trainable head preprocesses the images a batch at a time (batches, in order, unaugmented) and keeps
    only the features: bit for bit those of the whole split preprocessed at once and fed in the same slices."""
    import dataclasses

    from medvec.data.sources import load_split
    from medvec.hospital.privacy import head_features
    from medvec.models import head_name
    from medvec.preprocess import batches, to_tensor

    data = load_split(BREAST, "train").subset(torch.arange(50).numpy())
    spec = dataclasses.replace(tiny_base.spec, image_size=size)
    model = tiny_base.fresh()
    head = model.get_submodule(head_name(model))
    whole = to_tensor(data.images, spec)  # the way before: every image as float at model size, then sliced
    before = head_features(model, head, (whole[s : s + 16] for s in range(0, len(data), 16)), "cpu")
    streamed = head_features(model, head, (x for x, _ in batches(data, spec, 16)), "cpu")
    assert before.shape == (50, 64) and torch.equal(streamed, before)


def test_head_mode_never_preprocesses_more_than_a_batch_of_images(tiny_base, monkeypatch):
    """dp_finetune under privacy.trainable head hands to_tensor at most finetune.batch_size images at once, and
    never the whole split; the head still trains."""
    import medvec.hospital.privacy as privacy_module
    import medvec.preprocess
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split

    sizes: list[int] = []
    real = medvec.preprocess.to_tensor

    def counting(images, spec):
        sizes.append(len(images))
        return real(images, spec)

    def whole(images, spec):
        raise AssertionError("the whole split was preprocessed at once")

    monkeypatch.setattr(medvec.preprocess, "to_tensor", counting)
    monkeypatch.setattr(privacy_module, "to_tensor", whole)
    train = load_split(BREAST, "train").subset(torch.arange(40).numpy())
    cfg = FinetuneConfig(epochs=1, batch_size=16, threads=1)
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.0, trainable="head", epochs=1, batch_size=16, ema=None)
    model = tiny_base.fresh()
    privacy_module.dp_finetune(model, train, tiny_base.spec, cfg, privacy, progress=False)
    assert privacy.views == 8 and sizes == [16, 16, 8] * 8  # the default K: the plain images, then 7 augmented passes
    assert not torch.equal(model.fc.weight, tiny_base.model.fc.weight)


def test_a_centred_head_is_the_same_function_of_raw_features_before_and_after_training():
    """privacy.centre: W̃ = W·s and b̃ = b + W·μ give the same outputs on (x − μ)/s as the raw head on x; whatever
    the centred head learns, W = W̃/s and b = b̃ − W·μ give it back as a function of raw x."""
    from medvec.hospital.privacy import FeatureCentre

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(6, 2).double()
    x = torch.rand(10, 6, generator=g, dtype=torch.float64) * 6  # positive, as ReLU6-pooled features are
    centre = FeatureCentre(x.mean(0), 2.5)
    w0, b0, before = head.weight.detach().clone(), head.bias.detach().clone(), head(x).detach()
    centre.to_centred(head)
    assert torch.equal(head.weight, w0 * 2.5) and torch.allclose(head.bias, b0 + w0 @ x.mean(0), atol=1e-15)
    assert torch.allclose(head(centre.inputs(x)), before, atol=1e-12)
    with torch.no_grad():  # what DP-SGD might do to it
        head.weight.add_(torch.randn(2, 6, generator=g, dtype=torch.float64))
        head.bias.add_(1.0)
    learned = head(centre.inputs(x)).detach()
    with centre.raw(head):  # as the model is evaluated during training
        assert torch.allclose(head(x), learned, atol=1e-12)
    assert torch.allclose(head(centre.inputs(x)), learned, atol=1e-12)
    centre.to_raw(head)
    assert torch.allclose(head(x), learned, atol=1e-12)


def test_the_centre_is_the_public_features_mean_and_rms_and_never_a_hospital_s(tiny_base):
    import math

    from medvec.data.sources import load_split
    from medvec.hospital.local import LocalData
    from medvec.hospital.privacy import FeatureCentre, PrivateDataError, head_features
    from medvec.models import head_name
    from medvec.preprocess import batches

    public = load_split(BREAST, "val")
    model = tiny_base.fresh()
    head = model.get_submodule(head_name(model))
    centre = FeatureCentre.of(model, head, public, tiny_base.spec, 16, "cpu")
    f = head_features(model, head, (x for x, _ in batches(public, tiny_base.spec, 16)), "cpu")
    assert torch.allclose(centre.mean, f.mean(0), atol=1e-6)
    rms = float((f - f.mean(0)).norm(dim=1).mean()) / math.sqrt(f.shape[1])
    assert centre.scale == pytest.approx(rms, rel=1e-5)
    local = LocalData.of_splits(load_split(BREAST, "train").subset(torch.arange(40).numpy()), None, True, 0.25, 0)
    with pytest.raises(PrivateDataError, match=r"privacy\.centre names a hospital's private split"):
        FeatureCentre.of(model, head, local.train, tiny_base.spec, 16, "cpu")


def test_dp_with_a_public_centre_trains_another_head_at_the_same_privacy_and_reports_raw_validation(
    tiny_base, monkeypatch
):
    """The same σ, steps and ε as without the centre; another trained head; and the history's last validation
    metrics are the returned model's (evaluated with the head mapped back to raw features, not the centred one)."""
    from medvec.config import ConfigError, FinetuneConfig, PrivacyConfig, load_params
    from medvec.data.sources import load_split
    from medvec.evaluate import evaluate_model
    from medvec.hospital import privacy as privacy_module
    from medvec.hospital.privacy import dp_finetune

    validated: list[tuple[torch.Tensor, torch.Tensor]] = []  # the head each epoch's validation saw
    real = privacy_module.with_local_val

    def spy(entry, model, val, spec, device):
        validated.append((model.fc.weight.detach().clone(), model.fc.bias.detach().clone()))
        return real(entry, model, val, spec, device)

    monkeypatch.setattr(privacy_module, "with_local_val", spy)
    train = load_split(BREAST, "train").subset(torch.arange(120).numpy())
    val = load_split(BREAST, "val")
    cfg = FinetuneConfig(epochs=1, batch_size=32, threads=1)
    common = {"enabled": True, "target_epsilon": 3.0, "trainable": "head", "epochs": 2, "batch_size": 32, "ema": None}
    runs = {}
    for centre in (None, str(BREAST)):
        model = tiny_base.fresh()
        privacy = PrivacyConfig(**common, centre=centre)
        runs[centre] = (model, dp_finetune(model, train, tiny_base.spec, cfg, privacy, val=val, progress=False))
    (raw, plain), (centred, dp) = runs[None], runs[str(BREAST)]
    assert (dp.spent.noise_multiplier, dp.spent.steps, dp.spent.epsilon) == (
        plain.spent.noise_multiplier,
        plain.spent.steps,
        plain.spent.epsilon,
    )
    assert not torch.allclose(centred.fc.weight, raw.fc.weight)
    weight, bias = validated[-1]  # the last epoch validated the returned head (no EMA), in raw features
    assert torch.allclose(weight, centred.fc.weight, atol=1e-6) and torch.allclose(bias, centred.fc.bias, atol=1e-6)
    assert dp.result.history[-1]["val_auc"] == pytest.approx(evaluate_model(centred, val, tiny_base.spec)["auc"])
    with pytest.raises(ConfigError, match=r"privacy\.centre applies to trainable: head only"):
        load_params(None, ["privacy.trainable=all", f"privacy.centre={BREAST}"])


def test_augmentation_multiplicity_clips_each_example_s_mean_gradient_over_its_views():
    """privacy.augmentations K: Opacus computes a gradient per row (K rows an example); each example's per-sample
    gradient is then the mean of its K rows' gradients, as autograd computes them one row at a time."""
    import copy

    from opacus import GradSampleModule

    from medvec.hospital.privacy import _mean_over_views

    g = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(5, 2).double()
    rows, y = torch.randn(12, 5, generator=g, dtype=torch.float64), torch.randint(0, 2, (12,), generator=g)
    alone = copy.deepcopy(head)  # for autograd by hand, outside Opacus' hooks
    wrapped = GradSampleModule(head)
    torch.nn.functional.cross_entropy(wrapped(rows), y).backward()  # mean over rows, as the training loss
    params = list(head.parameters())
    _mean_over_views(params, 3)
    for p in params:
        assert p.grad_sample.shape == (4, *p.shape)
    for i in range(4):  # example i: rows 3i … 3i + 2
        by_hand = [torch.zeros_like(p) for p in params]
        for r in range(3 * i, 3 * i + 3):
            loss = torch.nn.functional.cross_entropy(alone(rows[r : r + 1]), y[r : r + 1])
            grads = torch.autograd.grad(loss, list(alone.parameters()))
            by_hand = [a + b / 3 for a, b in zip(by_hand, grads, strict=True)]
        for p, want in zip(params, by_hand, strict=True):
            assert torch.allclose(p.grad_sample[i], want, atol=1e-12)


@pytest.mark.parametrize("mode", ["head", "bn_affine"])
def test_k_identical_views_train_exactly_as_one_at_the_same_epsilon(tiny_base, monkeypatch, mode):
    """With augmentation made the identity, K = 4 views give each example its one view's gradient: the same
    trained weights as K = 1 (no clipping at C = 1000, so a sum over views instead of their mean would differ),
    the same σ, steps and ε; K real views too spend the same ε."""
    from medvec.config import FinetuneConfig, PrivacyConfig
    from medvec.data.sources import load_split
    from medvec.hospital import privacy as privacy_module

    train = load_split(BREAST, "train").subset(torch.arange(64).numpy())
    cfg = FinetuneConfig(epochs=1, batch_size=16, threads=1, augment=False)
    common = {"enabled": True, "target_epsilon": 3.0, "trainable": mode, "epochs": 2, "batch_size": 32}
    common |= {"max_grad_norm": 1000.0, "lr": 0.01, "ema": None}

    def trained(views: int):
        torch.manual_seed(0)  # Opacus' noise draws from the global generator
        model = tiny_base.fresh()
        privacy = PrivacyConfig(**common, augmentations=views)
        dp = privacy_module.dp_finetune(model, train, tiny_base.spec, cfg, privacy, progress=False)
        spent = (dp.spent.noise_multiplier, dp.spent.steps, dp.spent.epsilon)
        return torch.cat([p.detach().flatten() for p in model.parameters()]), spent

    assert [PrivacyConfig(trainable=m).views for m in ("head", "bn_affine", "all")] == [8, 1, 1]  # the defaults
    _, real_spent = trained(4)
    monkeypatch.setattr(privacy_module, "augment", lambda x, g: x)
    one, spent_one = trained(1)
    four, spent_four = trained(4)
    assert spent_four == spent_one == real_spent
    untrained = torch.cat([p.detach().flatten() for p in tiny_base.fresh().parameters()])
    assert not torch.allclose(one, untrained, atol=1e-4)
    assert torch.allclose(four, one, atol=1e-6)


def test_head_views_are_the_plain_features_then_augmented_ones(tiny_base):
    from medvec.data.sources import load_split
    from medvec.hospital.privacy import head_features, head_views
    from medvec.models import head_name
    from medvec.preprocess import batches

    data = load_split(BREAST, "train").subset(torch.arange(20).numpy())
    model = tiny_base.fresh()
    head = model.get_submodule(head_name(model))
    plain = head_features(model, head, (x for x, _ in batches(data, tiny_base.spec, 8)), "cpu")
    assert torch.equal(head_views(model, head, data, tiny_base.spec, 8, 1, 0, "cpu"), plain)
    views = head_views(model, head, data, tiny_base.spec, 8, 3, 0, "cpu")
    assert views.shape == (20, 3, 64) and torch.equal(views[:, 0], plain)
    assert not torch.allclose(views[:, 1], plain) and not torch.allclose(views[:, 2], views[:, 1])
    assert torch.equal(views, head_views(model, head, data, tiny_base.spec, 8, 3, 0, "cpu"))  # seeded


def test_an_example_s_dp_gradient_does_not_depend_on_the_labels_of_its_batch(tiny_base):
    """Class-weighted cross-entropy under DP: an example's per-sample gradient is w_y·∇ℓ whatever else is in its
    batch. (nn.CrossEntropyLoss(weight=w) divides by the batch's Σ w: the same example's gradient then changed with
    its neighbours' labels, a change per-sample clipping does not bound.)"""
    import copy

    from opacus import GradSampleModule

    from medvec.config import FinetuneConfig
    from medvec.data.sources import load_split
    from medvec.hospital.privacy import per_example_loss
    from medvec.hospital.train import loss_function

    train = load_split(BREAST, "train").subset(torch.arange(60).numpy())
    weighted = loss_function(train, FinetuneConfig(), torch.device("cpu"))
    assert weighted.weight is not None and not torch.equal(weighted.weight[0], weighted.weight[1])
    loss_fn = per_example_loss(weighted)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g)
    head = torch.nn.Linear(5, 2)

    def first_row_gradient(y: torch.Tensor) -> torch.Tensor:
        wrapped = GradSampleModule(copy.deepcopy(head))
        loss_fn(wrapped(x), y).backward()
        return wrapped._module.weight.grad_sample[0]

    a = first_row_gradient(torch.tensor([1, 0, 0, 0, 0, 0]))
    b = first_row_gradient(torch.tensor([1, 1, 1, 1, 1, 0]))  # the same first example, other neighbours
    assert torch.allclose(a, b, atol=1e-7)
    alone = copy.deepcopy(head)
    w1 = float(weighted.weight[1])
    loss = w1 * torch.nn.functional.cross_entropy(alone(x[:1]), torch.tensor([1]))
    assert torch.allclose(a, torch.autograd.grad(loss, alone.weight)[0], atol=1e-7)


def test_a_stored_privacy_run_is_named_by_nothing_the_async_default_changes():
    """privacy_tradeoff.py names each stored run by a hash of the params it ran with. refine.* was in it, so making
    FedAsync the asynchronous default again renamed every stored run, and the fresh-clone rebuild found none. No
    run there takes an asynchronous step: the name holds NAMED_REFINE, whatever params.yaml's refine is, and still
    follows what the runs do read."""
    from pathlib import Path

    from medvec.config import load_params

    root = Path(__file__).resolve().parents[1]
    pt = benchmark("privacy_tradeoff")
    data, yaml = str(root / "data" / "pneumoniamnist.npz"), root / "params.yaml"
    named = pt.run_settings(load_params(yaml), data)
    other = ["refine.fresh=true", "refine.weighting=network", "refine.mode=async", "refine.quorum=0.5"]
    assert pt.run_settings(load_params(yaml, other), data) == named
    assert pt.run_settings(load_params(yaml, ["finetune.epochs=3"]), data) != named
    assert named["params"]["refine"] == pt.NAMED_REFINE
