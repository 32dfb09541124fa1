"""The second-order demo (``python -m sparse_engine.second_order_demo``) end to end on small IDX
files written by the test: every method at every sparsity, exact counts, the l2 choice on the
validation split, and what it prints and writes. The real data set is used by
``make demo-second-order``."""
import json
from pathlib import Path

import pytest
import torch
from test_data_and_demo import make_dataset

from sparse_engine.models import second_order_mlp as mlp
from sparse_engine.second_order_demo import METHODS, main, parse_args

LAYERS = {"1": 784 * 40, "3": 40 * 20, "5": 20 * 10}
WEIGHTS = sum(LAYERS.values())


@pytest.fixture(autouse=True)
def _few_threads():
    # Tiny problems: OpenMP threads only add synchronisation on a loaded machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_demo_prunes_every_method_exactly_and_writes_results(tmp_path, capsys):
    root = make_dataset(tmp_path / "data", n_train=400, n_test=120)
    out = tmp_path / "out"
    sparsities = [0.5, 0.9, 0.98]
    l2_grid = [1e-2, 1e-4]
    rows = main(["--data-dir", str(root), "--epochs", "2", "--val-size", "100", "--n-grads", "64",
                 "--sparsities", *map(str, sparsities), "--l2", *map(str, l2_grid), "--stages", "2",
                 "--iht-iters", "5", "--obs-block-size", "16", "--out", str(out)])

    assert [(r["method"], r["target"]) for r in rows] == [(m, s) for s in sparsities for m in METHODS]
    by = {(r["method"], r["target"]): r for r in rows}
    for r in rows:
        s = r["target"]
        pruned = round(s * WEIGHTS)
        assert r["weights"] == WEIGHTS and r["kept"] == WEIGHTS - pruned, r
        assert r["sparsity"] == pytest.approx(pruned / WEIGHTS, abs=1e-12)
        assert sum(k for k, _ in r["layers"].values()) == r["kept"]
        assert {name: n for name, (_, n) in r["layers"].items()} == LAYERS
        assert 0.0 <= r["test_acc"] <= 1.0 and 0.0 <= r["val_acc"] <= 1.0 and r["seconds"] > 0
        if r["method"] == "OBS uniform":
            # SparseGPT's allocation: every layer at the target, exactly.
            assert r["layers"] == {name: [n - round(s * n), n] for name, n in LAYERS.items()}
        if r["method"] == "OBS global-alloc":
            # Global magnitude's layer budgets, per layer.
            assert r["layers"] == by["magnitude", s]["layers"]
        if r["method"] == "CHITA":
            trials = r["tuning"]
            assert [(t["l2"], t["backsolve"]) for t in trials] == [(l2, bs) for l2 in l2_grid for bs in (True, False)]
            # ties: the smaller l2, then the backsolve
            best = max(trials, key=lambda t: (t["val_acc"], -t["l2"], t["backsolve"]))
            assert (r["l2"], r["backsolve"], r["val_acc"]) == (best["l2"], best["backsolve"], best["val_acc"])
            assert r["tuning_seconds"] == pytest.approx(sum(t["seconds"] for t in trials))
            # CHITA++ takes CHITA's choice
            assert (by["CHITA++", s]["l2"], by["CHITA++", s]["backsolve"]) == (r["l2"], r["backsolve"])
        elif r["method"] != "CHITA++":
            assert r["l2"] is None and r["backsolve"] is None

    # At 98% global magnitude prunes the barely trained first layer (the smallest init scale) entirely:
    # OBS global-alloc zeroes it instead of solving.
    assert by["OBS global-alloc", 0.98]["layers"]["1"] == [0, LAYERS["1"]]

    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows
    meta = saved["meta"]
    assert meta["torch"] == torch.__version__ and meta["device"] == "cpu"
    assert (meta["train_size"], meta["val_size"], meta["test_size"]) == (300, 100, 120)
    assert meta["settings"]["n_grads"] == 64 and meta["settings"]["l2"] == l2_grid
    assert meta["settings"]["stages"] == 2 and meta["settings"]["sparsities"] == sparsities
    assert 0.0 <= meta["dense"]["test_acc"] <= 1.0 and meta["total_seconds"] > 0

    printed = capsys.readouterr().out
    table = (out / "results.md").read_text()
    assert table.strip() in printed
    acc_lines = [line for line in table.split("Wall time")[0].splitlines() if line.startswith("| ")]
    assert acc_lines[0] == "| method | 50% | 90% | 98% |"
    assert [line.split(" | ")[0][2:] for line in acc_lines[1:]] == ["dense", *METHODS]
    chita_line = next(line for line in acc_lines if line.startswith("| CHITA |"))
    assert chita_line == "| CHITA | " + " | ".join(f"{100 * by['CHITA', s]['test_acc']:.2f}" for s in sparsities) + " |"
    assert "| l2 | " + " | ".join(f"{by['CHITA', s]['l2']:g}" for s in sparsities) + " |" in table
    assert "| backsolve | " + " | ".join("on" if by["CHITA", s]["backsolve"] else "off" for s in sparsities) + " |" in table


def test_demo_single_l2_without_validation(tmp_path):
    root = make_dataset(tmp_path / "data", n_train=200, n_test=50)
    rows = main(["--data-dir", str(root), "--epochs", "1", "--val-size", "0", "--n-grads", "32",
                 "--sparsities", "0.8", "--methods", "magnitude", "CHITA", "--l2", "1e-3", "--iht-iters", "3",
                 "--backsolve", "off", "--out", str(tmp_path / "out")])
    assert [r["method"] for r in rows] == ["magnitude", "CHITA"]
    assert all(r["kept"] == WEIGHTS - round(0.8 * WEIGHTS) and r["val_acc"] is None for r in rows)
    assert rows[1]["l2"] == 1e-3 and rows[1]["backsolve"] is False and "tuning" not in rows[1]


def test_demo_model_and_bad_arguments(tmp_path, capsys):
    model = mlp()
    assert [tuple(m.weight.shape) for m in model if hasattr(m, "weight")] == [(40, 784), (20, 40), (10, 20)]
    assert all(getattr(m, "bias", None) is None for m in model)
    for argv, message in [(["--sparsities", "1.0"], "--sparsities must lie in"),
                          (["--l2", "0"], "--l2 must be > 0"),
                          (["--l2", "1e-3", "1e-4", "--val-size", "0"], "needs a validation split"),
                          (["--l2", "1e-3", "--val-size", "0"], "needs a validation split"),  # backsolve choose
                          (["--epochs", "0"], "--epochs")]:
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--data-dir"):
        main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    root = make_dataset(tmp_path / "data", n_train=100, n_test=10)
    with pytest.raises(SystemExit, match="fewer than"):
        main(["--data-dir", str(root), "--val-size", "50", "--n-grads", "80", "--out", str(tmp_path / "out")])


def test_authors_comparison_needs_a_checkout(tmp_path, monkeypatch, capsys):
    """bench/compare_chita_authors.py runs the authors' code from a checkout the user gives; it is
    neither included nor fetched, and without it the script stops with a message saying so."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import compare_chita_authors as compare
    with pytest.raises(SystemExit):
        compare.main([])
    assert "--authors: the path of a local checkout of github mazumder-lab/CHITA is required" in capsys.readouterr().err
    (tmp_path / "pruners").mkdir()
    (tmp_path / "pruners" / "CHITA.py").write_text("")
    with pytest.raises(SystemExit, match="not a checkout of mazumder-lab/CHITA .missing CHITA_opt/L0_card_const.py"):
        compare.main(["--authors", str(tmp_path), "--quick"])


def test_authors_comparison_other_mlp_shapes(monkeypatch, capsys):
    """--hidden builds a bias-free 784-hidden-10 MLP (the demo's own MLP for 40 20, the same
    initialization) whose Linear weights both codes prune; bad --hidden / --name are refused."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "bench"))
    import compare_chita_authors as compare
    torch.manual_seed(3)
    demo = compare.build_mlp([40, 20])
    torch.manual_seed(3)
    ref = mlp()
    assert all(torch.equal(a, b) for a, b in zip(demo.state_dict().values(), ref.state_dict().values()))
    shallow = compare.build_mlp([32])
    assert compare.weight_names(shallow) == ["1.weight", "3.weight"]
    assert [tuple(p.shape) for p in shallow.parameters()] == [(32, 784), (10, 32)]
    assert shallow(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    w = torch.randn(32 * 784 + 10 * 32)
    assert torch.equal(compare.flat_weights(compare.with_weights(shallow, w)), w)
    for argv, message in ((["--hidden", "0"], "--hidden: expected widths >= 1"),
                          (["--name", "a/b"], "--name: expected letters, digits")):
        with pytest.raises(SystemExit):
            compare.parse_args(["--authors", "x", *argv])
        assert message in capsys.readouterr().err
