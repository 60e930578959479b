from __future__ import annotations

import numpy as np
import pytest
import torch

from medvec.evaluate import metrics
from medvec.hospital.train import class_weights, lr_schedule
from medvec.runtime import pick_device


def test_class_weights_balance_the_loss():
    w = class_weights([388, 3494])
    assert torch.allclose(w, torch.tensor([3882 / (2 * 388), 3882 / (2 * 3494)]))
    assert torch.equal(class_weights([0, 4]), torch.tensor([0.0, 1.0]))


def test_cosine_schedule_with_warmup():
    f = lr_schedule(total=10, warmup=2)
    assert [round(f(s), 6) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


def test_pick_device_honours_explicit_choice():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in ("cpu", "cuda", "mps")


def test_metrics_match_hand_computation():
    y = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])
    m = metrics(y, np.stack([1 - p1, p1], 1))
    # pairs (neg, pos): 6 pairs, correctly ordered: 0.1<all 3; 0.6<0.8,0.9 -> 5/6
    assert m["auc"] == pytest.approx(5 / 6)
    # predictions: 0,1,0,1,1 -> recall class0 1/2, class1 2/3
    assert m["recall"] == pytest.approx([0.5, 2 / 3])
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 2 / 3) / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion"] == [[1, 1], [1, 2]]


def test_multiclass_auc_is_one_vs_rest_macro():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])
    p = rng.dirichlet(np.ones(3), size=9)
    assert metrics(y, p)["auc"] == pytest.approx(roc_auc_score(y, p, multi_class="ovr", average="macro"))


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_single_class_auc_is_nan_not_an_error():
    assert np.isnan(metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]))["auc"])


def test_the_registered_label_is_the_positive_probability_at_the_threshold_not_the_argmax():
    from medvec.serving import label_frame

    logits = torch.tensor([[0.0, -1.0], [0.0, 0.5], [2.0, 0.0]])  # p_1 = 0.269, 0.622, 0.119
    p1 = torch.softmax(logits, 1)[:, 1].numpy()
    model = torch.nn.Identity()
    x = logits.numpy()
    assert label_frame(model, x, None)["label"].tolist() == [0, 1, 0]  # no threshold: the argmax
    assert label_frame(model, x, 0.2)["label"].tolist() == [1, 1, 0]
    assert label_frame(model, x, 0.7)["label"].tolist() == [0, 0, 0]
    np.testing.assert_allclose(label_frame(model, x, 0.2)["p_1"], p1, rtol=1e-6)


def test_a_hospital_name_cannot_plant_markup_or_links_in_an_mlflow_description():
    from medvec.evaluate import md_inert as _md

    assert _md("st-marys") == "st-marys"
    assert _md("x | [click](https://evil)\n# big") == "x \\| \\[click\\](https://evil) \\# big"


class _Margins(torch.nn.Module):
    """Logits (0, m) with m = scale × (the image's mean pixel − 0.5): a binary model whose margins reach ±scale/2."""

    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        m = self.scale * (x.mean(dim=(1, 2, 3)) - 0.5)
        return torch.stack([torch.zeros_like(m), m], 1)


def test_auc_ranks_by_log_odds_where_a_float32_softmax_saturates():
    from medvec.data.sources import load_split
    from medvec.evaluate import evaluate_model, log_odds, predict, probabilities
    from medvec.models import ModelSpec

    # log-odds of each class: z_c − logsumexp of the others, exactly
    z = torch.tensor([[0.0, 40.0], [1.0, 2.0], [3.0, -50.0]])
    assert log_odds(z) == pytest.approx(np.array([[-40.0, 40.0], [-1.0, 1.0], [53.0, -53.0]]))
    three = log_odds(torch.tensor([[0.0, 1.0, 2.0]]))[0]
    assert three[2] == pytest.approx(2 - np.log(np.exp(0) + np.exp(1)))
    assert three[0] == pytest.approx(0 - np.log(np.exp(1) + np.exp(2)))
    # real images, a model whose margins pass 17: the probabilities tie at 1, the log-odds keep the order
    data = load_split("data/pneumoniamnist.npz", "val").subset(np.arange(200))
    spec = ModelSpec("margins", 28, 3, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    small, large = evaluate_model(_Margins(1.0), data, spec), evaluate_model(_Margins(400.0), data, spec)
    tied = int((predict(_Margins(400.0), data, spec)[:, 1] == 1.0).sum())
    assert tied > 10  # saturated: P = 1 exactly, past a margin of ~37 even in float64
    p = probabilities(torch.tensor([[0.0, 20.0], [0.0, 25.0], [0.0, 30.0]]))[:, 1]
    assert p.dtype == torch.float64 and p[0] < p[1] < p[2] < 1  # float32 gives 1, 1, 1: a threshold sees one value
    assert large["auc"] == pytest.approx(small["auc"], abs=1e-12)  # a scale of the margin ranks the same
    assert metrics(data.labels, large["proba"])["auc"] != pytest.approx(small["auc"], abs=1e-3)  # what ties cost
    # medvec predict on labelled images scores them as the evaluation does: by the log-odds
    from medvec.hospital.predict import labelled_metrics
    from medvec.preprocess import to_tensor
    from medvec.serving import class_scores

    p, odds = class_scores(_Margins(400.0), to_tensor(data.images, spec))
    assert labelled_metrics(np.asarray(data.labels), p, None, odds)["auc"] == pytest.approx(large["auc"], abs=1e-12)
