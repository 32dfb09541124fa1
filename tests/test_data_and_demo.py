"""The Fashion-MNIST IDX loader and the demo, on small IDX files written by the test (the real
data set is used by `make demo`; the last test reads it when it is installed)."""
import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sparse_engine.data import load_fashion_mnist
from sparse_engine.data.fashion_mnist import DEFAULT_DIRS, MEAN, STD, read_idx


def write_idx(path: Path, array: np.ndarray, gz: bool):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def make_dataset(root: Path, n_train=300, n_test=100, gz=True, seed=0) -> Path:
    """Images whose mean brightness encodes the class, so a model can learn something."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n)
        images = np.clip(rng.normal(labels[:, None, None] * 25.0, 20.0, (n, 28, 28)), 1, 255)
        write_idx(root / f"{split}-images-idx3-ubyte", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte", labels, gz)
    return root


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_load_idx(tmp_path, gz):
    root = make_dataset(tmp_path / "d", gz=gz)
    x, y = load_fashion_mnist("train", root, normalize=False)
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32 and y.shape == (300,) and y.dtype == torch.int64
    raw = read_idx(root / ("train-images-idx3-ubyte" + (".gz" if gz else "")))
    assert torch.equal(x[:, 0], torch.from_numpy(raw.astype(np.float32) / 255))
    xt, _ = load_fashion_mnist("test", root)
    assert xt.shape == (100, 1, 28, 28)
    # The lookup table gives the same bits as standardising the images themselves.
    raw_test = read_idx(root / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")))
    direct = (torch.from_numpy(raw_test.astype(np.float32) / 255.0) - MEAN) / STD
    assert torch.equal(xt[:, 0], direct)


def test_missing_data_names_the_option(tmp_path):
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_fashion_mnist("train", tmp_path)
    with pytest.raises(ValueError, match="split: expected one of"):
        load_fashion_mnist("valid", tmp_path)


def test_corrupt_idx(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(tmp_path / "bad")
    write_idx(tmp_path / "short", np.ones((2, 3)), gz=False)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_demo_runs_every_method_and_prunes_exactly(tmp_path, capsys):
    from sparse_engine.demo import METHODS, main
    root = make_dataset(tmp_path / "data", n_train=512, n_test=128)
    out = tmp_path / "out"
    rows = main(["--data-dir", str(root), "--train-size", "512", "--epochs", "1", "--retrain-epochs", "1",
                 "--sparsities", "0.5", "0.9", "--out", str(out), "--threads", "1"])
    assert {(r["model"], r["method"]) for r in rows} == {(m, x) for m in ("mlp", "cnn")
                                                          for x in ("dense",) + METHODS}
    n = {"mlp": 784 * 300 + 300 * 100 + 100 * 10, "cnn": 8 * 9 + 16 * 8 * 9 + 16 * 49 * 64 + 64 * 10}
    for r in rows:
        if r["method"] != "dense":
            assert r["sparsity"] == round(r["target"] * n[r["model"]]) / n[r["model"]], r
    saved = json.loads((out / "results.json").read_text())
    assert saved["rows"] == rows
    assert (out / "sparsity_accuracy.png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "| mlp | IMP+SLR |" in printed and "| cnn | FGGP |" in printed


def test_demo_compares_stacking(tmp_path, capsys):
    from sparse_engine.demo import main
    root = make_dataset(tmp_path / "data", n_train=256, n_test=64)
    out = tmp_path / "out"
    main(["--data-dir", str(root), "--train-size", "256", "--epochs", "1", "--retrain-epochs", "1", "--models", "mlp",
          "--methods", "one-shot", "GMP", "--sparsities", "0.5", "0.9", "--out", str(out), "--threads", "1",
          "--stack", "3", "--compare-stacking"])
    meta = json.loads((out / "results.json").read_text())["meta"]
    assert meta["stacking"] == {"mlp": 3} and set(meta["wall_s"]) == {"stack 3", "stack 1"}
    assert all(v > 0 for v in meta["wall_s"].values())
    assert (out / "stack-1" / "journal.jsonl").exists()
    assert "stacking (pruning trials per stacked model): mlp: 3" in capsys.readouterr().out


def test_demo_reports_missing_data(tmp_path):
    from sparse_engine.demo import main
    with pytest.raises(SystemExit, match="--data-dir"):
        main(["--data-dir", str(tmp_path)])


@pytest.mark.skipif(not Path(DEFAULT_DIRS[0]).is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and set(y.unique().tolist()) == set(range(10))
    assert abs(x.mean().item()) < 0.05 and abs(x.std().item() - 1) < 0.05
