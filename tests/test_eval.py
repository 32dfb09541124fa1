"""Evaluation beyond accuracy: metrics on constructed cases with known answers, the corruptions'
formulas, and the one-pass comparison (identical models agree everywhere, flat dict of floats)."""
import copy
import math

import pytest
import torch
from torch import nn

from sparse_engine import prune_, sparsify
from sparse_engine.eval import (CORRUPTIONS, NOISE_LEVELS, agreement, calibration_errors, class_accuracies,
                                compare_models, corrupt, model_metrics, output_distances, uniform_noise,
                                worst_class_accuracy)


def two_class_logits(confidence: float, predicted: int) -> list[float]:
    """Logits whose softmax gives ``confidence`` to class ``predicted`` of two."""
    z = [0.0, 0.0]
    z[predicted] = math.log(confidence / (1 - confidence))
    return z


def test_ece_and_mce_by_hand():
    """10 predictions at confidence 0.9, 6 right: bin (0.867, 0.933], gap |0.6 - 0.9| = 0.3;
    10 at confidence 0.6, all right: bin (0.533, 0.6], gap |1 - 0.6| = 0.4.
    ECE = 0.5 * 0.3 + 0.5 * 0.4 = 0.35, MCE = 0.4."""
    logits = torch.tensor([two_class_logits(0.9, 0)] * 10 + [two_class_logits(0.6, 1)] * 10, dtype=torch.float64)
    labels = torch.tensor([0] * 6 + [1] * 4 + [1] * 10)
    ece, mce = calibration_errors(logits, labels, bins=15)
    assert ece == pytest.approx(0.35, abs=1e-12) and mce == pytest.approx(0.4, abs=1e-12)
    # perfectly calibrated: confidence 0.75, 3 of 4 right
    logits = torch.tensor([two_class_logits(0.75, 0)] * 4, dtype=torch.float64)
    assert calibration_errors(logits, torch.tensor([0, 0, 0, 1]))[0] == pytest.approx(0.0, abs=1e-12)
    # with one bin the ECE is |mean accuracy - mean confidence|
    logits = torch.tensor([two_class_logits(0.9, 0)] * 10 + [two_class_logits(0.6, 1)] * 10)
    assert calibration_errors(logits, torch.tensor([0] * 6 + [1] * 14), bins=1)[0] == pytest.approx(0.05)


def test_class_accuracy_agreement_and_distances_by_hand():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0]])
    labels = torch.tensor([0, 1, 2, 2])
    assert class_accuracies(logits, labels) == {0: 1.0, 1: 1.0, 2: 0.5}
    assert worst_class_accuracy(logits, labels) == 0.5
    other = logits.clone()
    other[0] = torch.tensor([2.0, 6.0, 3.0])   # differs by (0, 5, 3): L2 sqrt(34), L-inf 5; argmax changes
    assert agreement(logits, other) == 0.75
    d = output_distances(logits, other)
    assert d["logit_l2"] == pytest.approx(math.sqrt(34) / 4) and d["logit_linf"] == pytest.approx(5 / 4)
    p, q = logits[0].double().softmax(-1), other[0].double().softmax(-1)
    assert d["softmax_l2"] == pytest.approx(float((p - q).norm()) / 4)
    assert d["softmax_linf"] == pytest.approx(float((p - q).abs().max()) / 4)
    same = output_distances(logits, logits.clone())
    assert all(v == 0.0 for v in same.values()) and agreement(logits, logits) == 1.0


def test_metric_errors():
    with pytest.raises(ValueError, match=r"labels: expected an int64 tensor of shape \(2,\)"):
        calibration_errors(torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"bins: expected an int >= 1"):
        calibration_errors(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64), bins=0)
    with pytest.raises(ValueError, match=r"reference: expected the shape of logits"):
        agreement(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"logits: expected a float tensor of shape \(N, classes\)"):
        output_distances(torch.zeros(2, dtype=torch.int64), torch.zeros(2))


# -- perturbations ------------------------------------------------------------------------------

def images(n=6, c=1, h=28, w=28, seed=0):
    return torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def test_noise_levels_are_torchprunes():
    assert len(NOISE_LEVELS) == 15 and NOISE_LEVELS[0] == 0.0 and NOISE_LEVELS[-1] == pytest.approx(0.7)
    assert NOISE_LEVELS[1] == pytest.approx(0.05)


def test_uniform_noise_fills_the_eps_ball():
    x = torch.randn(200, 1, 28, 28)
    y = uniform_noise(x, 0.3, torch.Generator().manual_seed(0))
    d = y - x
    assert d.abs().max() <= 0.3 + 1e-6 and d.abs().max() > 0.299
    assert abs(float(d.mean())) < 0.01 and float(d.std()) == pytest.approx(0.3 / math.sqrt(3), rel=0.01)
    assert torch.equal(uniform_noise(x, 0.0), x)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruptions_stay_images_and_grow_with_severity(name):
    x = images(c=3, h=32, w=32).clamp(0.05, 0.95)
    changes = []
    for s in range(1, 6):
        y = corrupt(x, name, s, torch.Generator().manual_seed(s))
        assert y.shape == x.shape and y.dtype == x.dtype and y.min() >= 0 and y.max() <= 1
        again = corrupt(x, name, s, torch.Generator().manual_seed(s))
        assert torch.equal(y, again)                              # reproducible from the generator
        changes.append(float((y - x).abs().mean()))
    assert changes[0] > 0
    assert changes[-1] > changes[0], changes


def test_corruption_formulas():
    x = images()
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", 2), ((x - m) * 0.5 + m).clamp(0, 1))
    torch.testing.assert_close(corrupt(x, "brightness", 5), (x + 0.3).clamp(0, 1))
    flat = torch.full((2, 1, 28, 28), 0.4)
    for name in ("gaussian_blur", "pixelate", "contrast"):
        torch.testing.assert_close(corrupt(flat, name, 5), flat)   # constant images stay constant
    impulse = corrupt(x, "impulse_noise", 5, torch.Generator().manual_seed(0))
    changed = impulse != x
    assert (impulse[changed] == 0).logical_or(impulse[changed] == 1).all()
    assert float(changed.float().mean()) == pytest.approx(0.07, abs=0.02)
    # the blur of a single bright pixel is the separable Gaussian kernel of std 1 (severity 5)
    dot = torch.zeros(1, 1, 15, 15)
    dot[0, 0, 7, 7] = 1.0
    blurred = corrupt(dot, "gaussian_blur", 5)
    t = torch.arange(-7.0, 8.0)
    g = torch.exp(-t ** 2 / 2)
    g = g / torch.exp(-torch.arange(-4.0, 5.0) ** 2 / 2).sum()   # kernel radius 4 = ceil(4 sigma)
    g[(t.abs() > 4)] = 0
    torch.testing.assert_close(blurred[0, 0], torch.outer(g, g))


def test_corrupt_errors():
    with pytest.raises(ValueError, match=r"name: expected one of"):
        corrupt(images(), "fog", 1)
    with pytest.raises(ValueError, match=r"severity: expected an int in \(1, 2, 3, 4, 5\)"):
        corrupt(images(), "contrast", 0)
    with pytest.raises(ValueError, match=r"x: expected float images of shape \(N, C, H, W\)"):
        corrupt(torch.rand(3, 28, 28), "contrast", 1)


# -- the one pass -------------------------------------------------------------------------------

def classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4 * 28 * 28, 10))


def data(n=50):
    g = torch.Generator().manual_seed(3)
    return (torch.rand(n, 1, 28, 28, generator=g) - 0.286) / 0.353, torch.randint(0, 10, (n,), generator=g)


SMALL = dict(noise_levels=NOISE_LEVELS[::7], corruptions=("gaussian_noise", "contrast"), severities=(1, 5),
             batch_size=16)


def test_identical_models_agree_everywhere():
    dense = classifier()
    x, y = data()
    row = compare_models(dense, copy.deepcopy(dense), x, y, **SMALL)
    assert all(isinstance(v, float) for v in row.values())
    assert row["agreement"] == 1.0 and row["disagreements"] == 0.0
    assert row["logit_l2"] == row["logit_linf"] == row["softmax_l2"] == row["softmax_linf"] == 0.0
    agreements = [k for k in row if k.endswith("_agreement") or k.endswith("_agreement_mean")]
    assert len(agreements) == 3 + 2 * 2 + 2 and all(row[k] == 1.0 for k in agreements)
    for k in [k for k in row if not k.startswith("dense_") and f"dense_{k}" in row]:
        assert row[k] == row[f"dense_{k}"], k
    expected = {"accuracy", "ece", "mce", "worst_class_accuracy", "noise0_acc", "noise0.35_acc", "noise0.7_acc",
                "noise_acc_mean", "gaussian_noise_s1_acc", "gaussian_noise_s5_acc", "contrast_s1_acc",
                "contrast_s5_acc", "corruption_acc_mean"}
    assert expected <= set(row) and {f"dense_{k}" for k in expected} <= set(row)
    assert row["noise0_acc"] == row["accuracy"]   # level 0 adds nothing


def test_pruned_against_dense_and_single_model_metrics():
    dense = classifier()
    pruned = sparsify(copy.deepcopy(dense))
    prune_(pruned, 0.9)
    dense.train()
    x, y = data()
    row = compare_models(pruned, dense, x, y, **SMALL)
    assert dense.training and pruned.training   # train/eval modes restored
    with torch.no_grad():
        dense.eval()
        zp, zd = pruned.eval()(x), dense(x)
    assert row["agreement"] == agreement(zp, zd)
    assert row["disagreements"] == float((zp.argmax(-1) != zd.argmax(-1)).sum())
    assert row["logit_l2"] == pytest.approx(output_distances(zp, zd)["logit_l2"], rel=1e-5)
    assert row["accuracy"] == float((zp.argmax(-1) == y).sum()) / len(y)
    assert row["ece"] == pytest.approx(calibration_errors(zp, y)[0], rel=1e-5)
    assert row["worst_class_accuracy"] == worst_class_accuracy(zp, y)
    single = model_metrics(pruned, x, y, **SMALL)
    assert single == {k: v for k, v in row.items() if not k.startswith("dense_") and "agree" not in k
                      and k not in ("disagreements", "logit_l2", "logit_linf", "softmax_l2", "softmax_linf")}
    assert model_metrics(pruned, x, y, **SMALL) == single   # same seed, same perturbations


def test_constant_model_is_immune_to_perturbations():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.arange(10.0))

        def forward(self, x):
            return self.bias.expand(x.shape[0], 10)

    x, y = data()
    row = model_metrics(Constant(), x, y, **SMALL)
    acc = float((y == 9).sum()) / len(y)
    accuracies = [k for k in row if k.endswith("_acc") or k.endswith("acc_mean") or k == "accuracy"]
    assert len(accuracies) == 1 + 3 + 1 + 4 + 1
    assert all(row[k] == pytest.approx(acc, abs=1e-15) for k in accuracies)


def test_compare_errors():
    dense = classifier()
    x, y = data()
    cases = [
        (dict(y=y.float()), r"y: expected int64 labels of shape \(50,\)"),
        (dict(corruptions=("fog",)), r"corruptions: expected distinct names"),
        (dict(severities=(0,)), r"severities: expected distinct ints"),
        (dict(noise_levels=(-0.1,)), r"noise_levels: expected finite numbers >= 0"),
        (dict(noise_levels=(0.1, 0.1)), r"noise_levels: expected distinct levels"),
        (dict(normalization=(0.5, 0.0)), r"normalization: expected None or \(mean, std\)"),
        (dict(batch_size=0), r"batch_size: expected an int >= 1"),
        (dict(x=x.flatten(1)), r"corruptions: act on images"),
    ]
    for kw, message in cases:
        args = {"x": x, "y": y, **kw}
        with pytest.raises(ValueError, match=message):
            compare_models(dense, dense, args.pop("x"), args.pop("y"), **args)
    with pytest.raises(TypeError, match="dense: expected an nn.Module"):
        compare_models(dense, "dense", x, y)


def test_demo_stores_the_metrics_beside_accuracy(tmp_path):
    import json

    from sparse_engine.demo import main
    from test_data_and_demo import make_dataset

    root = make_dataset(tmp_path / "data", n_train=256, n_test=64)
    rows = main(["--data-dir", str(root), "--train-size", "256", "--epochs", "1", "--retrain-epochs", "1",
                 "--models", "mlp", "--methods", "one-shot", "--sparsities", "0.9", "--beyond-accuracy",
                 "--out", str(tmp_path / "out")])
    dense, pruned = rows
    assert dense["accuracy"] == pytest.approx(dense["acc"]) and "agreement" not in dense
    assert pruned["accuracy"] == pytest.approx(pruned["acc"])
    assert pruned["dense_accuracy"] == pytest.approx(dense["acc"]) and pruned["dense_ece"] == dense["ece"]
    assert 0.0 <= pruned["agreement"] <= 1.0 and "contrast_s5_agreement" in pruned and "noise0.7_acc" in pruned
    assert json.loads((tmp_path / "out" / "results.json").read_text())["rows"] == rows
