"""DINO weighted k-NN: accuracy on real data, a hand-computed vote, chunking, the official golden numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from evaluations.knn import KNNConfig, knn_classify
from harness.errors import UserError

GOLDEN = Path(__file__).parent / "fixtures" / "golden" / "knn.json"


def test_digits_raw_pixels_reach_known_accuracy():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=0, stratify=digits.target
    )
    values = knn_classify(
        torch.tensor(x_train, dtype=torch.float32),
        torch.tensor(y_train),
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test),
        ks=(20,),
        temperature=0.07,
    )
    print(f"digits raw-pixel k-NN (k=20, T=0.07): top1 {values['top1']:.2f}%, top5 {values['top5']:.2f}%")
    assert values["top1"] >= 95.0
    assert values["top5"] >= values["top1"]


def _two_class_case():
    # 4 training points on the unit circle, scaled (k-NN must normalise), 2 classes; tests at 0° and 180°.
    s = math.sqrt(1 - 0.9**2)
    train = torch.tensor([[3.0, 0.0], [0.9, s], [0.9, -s], [-2.0, 0.0]])
    train_labels = torch.tensor([1, 0, 0, 1])
    test = torch.tensor([[1.0, 0.0], [-5.0, 0.0]])
    test_labels = torch.tensor([0, 1])
    return train, train_labels, test, test_labels


def test_weighted_vote_by_hand():
    # Test point 0 (class 0): nearest is a class-1 point (sim 1), then two class-0 points (sim 0.9).
    # k=3, T=0.07: class 1 scores e^(1/0.07) > class 0's 2·e^(0.9/0.07) (ratio e^1.43/2 ≈ 2.1), a miss;
    # T=1: 2·e^0.9 ≈ 4.92 beats e^1 ≈ 2.72, a hit. Test point 1 is right for every k and T.
    case = _two_class_case()
    sharp = knn_classify(*case, ks=(1, 3), temperature=0.07, num_classes=2)
    assert sharp["top1@k3"] == pytest.approx(50.0)
    soft = knn_classify(*case, ks=(1, 3), temperature=1.0, num_classes=2)
    assert soft["top1@k3"] == pytest.approx(100.0)
    # A plain majority vote would say class 0 for k=3 at any T; the weights are what flip it.
    assert math.exp(1 / 0.07) > 2 * math.exp(0.9 / 0.07) and 2 * math.exp(0.9) > math.exp(1.0)


def test_top5_looks_at_min_5_k_ranks():
    case = _two_class_case()
    values = knn_classify(*case, ks=(1, 3), temperature=0.07, num_classes=2)
    # k=1: one rank only, so test point 0's true class at rank 2 does not count (DINO commit 5783b4b).
    assert values["top1@k1"] == pytest.approx(50.0)
    assert values["top5@k1"] == pytest.approx(50.0)
    # k=3: ranks 1-2 exist (2 classes), the true class is rank 2.
    assert values["top5@k3"] == pytest.approx(100.0)


def test_k_above_train_size_is_clamped_and_keeps_its_key():
    case = _two_class_case()
    values = knn_classify(*case, ks=(4, 200), temperature=1.0, num_classes=2)
    assert values["top1@k200"] == values["top1@k4"] == pytest.approx(100.0)
    # Without 20 among the ks, the headline is the first k.
    assert values["top1"] == values["top1@k4"]


def test_headline_is_k20_when_present():
    gen = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels = torch.arange(50) % 5
    values = knn_classify(train, labels, test, torch.arange(20) % 5, ks=(10, 20, 100))
    assert values["top1"] == values["top1@k20"] and values["top5"] == values["top5@k20"]
    assert set(values) == {f"top{t}@k{k}" for t in (1, 5) for k in (10, 20, 100)} | {"top1", "top5"}


def test_chunked_equals_unchunked():
    gen = torch.Generator().manual_seed(1)
    train, test = torch.randn(300, 32, generator=gen), torch.randn(97, 32, generator=gen)
    train_labels = torch.randint(0, 10, (300,), generator=gen)
    test_labels = torch.randint(0, 10, (97,), generator=gen)
    # Make the task learnable so the accuracies are not all near chance.
    train += 4 * torch.nn.functional.one_hot(train_labels, 32)
    test += 4 * torch.nn.functional.one_hot(test_labels, 32)
    whole = knn_classify(train, train_labels, test, test_labels, ks=(1, 5, 20, 200), chunk_size=10_000)
    for chunk in (1, 7, 96, None):
        chunked = knn_classify(train, train_labels, test, test_labels, ks=(1, 5, 20, 200), chunk_size=chunk)
        assert chunked == whole
    assert whole["top1@k20"] > 50.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(2)
    train, test = torch.randn(500, 64, generator=gen), torch.randn(130, 64, generator=gen)
    train_labels = torch.randint(0, 7, (500,), generator=gen)
    test_labels = torch.randint(0, 7, (130,), generator=gen)
    cpu = knn_classify(train, train_labels, test, test_labels, chunk_size=16)
    cuda = knn_classify(train.cuda(), train_labels.cuda(), test.cuda(), test_labels.cuda(), chunk_size=16)
    assert cuda == pytest.approx(cpu)


@pytest.mark.skipif(not GOLDEN.exists(), reason="golden fixture knn.json not generated yet")
@pytest.mark.parametrize("case", ["classes5", "classes10"])
def test_matches_official_dino_knn_classifier(case):
    golden = json.loads(GOLDEN.read_text())
    assert golden["provenance"]["function"] == "knn_classifier"
    inputs, expected, ks = golden["inputs"][case], golden["outputs"][case], golden["inputs"]["k"]
    # The fixture is float64 (the official run's default dtype); knn_classify keeps float64 inputs.
    values = knn_classify(
        torch.tensor(inputs["train_features"], dtype=torch.float64),
        torch.tensor(inputs["train_labels"]),
        torch.tensor(inputs["test_features"], dtype=torch.float64),
        torch.tensor(inputs["test_labels"]),
        ks=ks,
        temperature=golden["inputs"]["T"],
        num_classes=inputs["num_classes"],
    )
    for i, k in enumerate(ks):
        assert values[f"top1@k{k}"] == pytest.approx(expected["top1"][i], abs=1e-5), f"top1 at k={k}"
        assert values[f"top5@k{k}"] == pytest.approx(expected["top5"][i], abs=1e-5), f"top5 at k={k}"
        # Ties between zero-score classes may order differently elsewhere; stay inside the tie-free bounds.
        low, high = expected["top5_bounds"][i]
        assert low - 1e-5 <= values[f"top5@k{k}"] <= high + 1e-5


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ks": ()}, "knn.ks"),
        ({"ks": (20, 0)}, "knn.ks"),
        ({"ks": (-5,)}, "knn.ks"),
        ({"temperature": 0.0}, "knn.temperature"),
        ({"temperature": -0.07}, "knn.temperature"),
        ({"batch_size": 0}, "knn.batch_size"),
    ],
)
def test_config_validation_is_one_line(kwargs, field):
    with pytest.raises(UserError) as err:
        KNNConfig(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ") and "\n" not in str(err.value)


def test_config_accepts_lists_from_yaml():
    cfg = KNNConfig(ks=[10, 20])
    assert cfg.ks == (10, 20)
    hash(cfg)
