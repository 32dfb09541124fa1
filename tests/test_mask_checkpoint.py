"""Masks that cannot be lost (issue 10 item 4): safetensors, rebuilt dicts, a forgotten mask_optimizer.

The issue-11 load tests (corrupt masks, other architectures, tied weights, meta devices) are in
``test_load_reliability.py``.
"""
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import sparse_engine as se
from sparse_engine import (load_safetensors, mask_optimizer, missing_masks, prune_, save_safetensors, sparse_modules,
                           sparsify, sparsity_report)
from sparse_engine.models import build_model, example_batch
from sparse_checkpoints import assert_consistent, masks, mlp, pruned_mlp, roundtrip


# ---- issue 10 item 4: masks that cannot be lost ------------------------------------------------

def test_prefix_stripped_state_dict_keeps_sparsity():
    model = pruned_mlp()
    wrapped = nn.Sequential()
    wrapped.add_module("module", model)  # what DDP's state_dict looks like
    rebuilt = {k.removeprefix("module."): v for k, v in wrapped.state_dict().items()}  # a plain dict: no _metadata
    fresh = sparsify(mlp())
    fresh.load_state_dict(rebuilt, strict=True)
    for a, b in zip(masks(fresh).values(), masks(model).values()):
        assert torch.equal(a, b)
    assert sparsity_report(fresh).density == pytest.approx(sparsity_report(model).density)


def test_missing_masks_dense_restores_the_old_behaviour():
    model = pruned_mlp()
    rebuilt = dict(model.state_dict())
    fresh = sparsify(mlp())
    with missing_masks("dense"):
        fresh.load_state_dict(rebuilt)
    assert sparsity_report(fresh).density == 1.0
    fresh.load_state_dict(rebuilt)  # outside the block: derived from zeros again
    assert sparsity_report(fresh).density < 0.5
    with pytest.raises(ValueError, match="policy: expected one of"):
        with missing_masks("ones"):
            pass


def test_all_zero_weight_without_mask_warns():
    model = sparsify(mlp())
    sd = dict(model.state_dict())
    sd["2.weight"] = torch.zeros_like(sd["2.weight"])
    with pytest.warns(UserWarning, match="'2.weight' was loaded as all zeros"):
        model.load_state_dict(sd)
    assert not model[2].mask.any()


def test_safetensors_helpers_keep_masks_exactly(tmp_path):
    model = pruned_mlp()
    with torch.no_grad():  # a kept weight that is exactly 0: only a saved mask can tell it from a pruned one
        kept = model[0].mask.nonzero()[0]
        model[0].weight[tuple(kept)] = 0.0
    path = tmp_path / "m.safetensors"
    save_safetensors(model, path, metadata={"note": "test"})
    fresh = sparsify(mlp())
    load_safetensors(fresh, path)
    for a, b in zip(masks(model).values(), masks(fresh).values()):
        assert torch.equal(a, b)
    # The same file loads into the dense architecture strictly, and through a plain load_file.
    dense = mlp()
    load_safetensors(dense, path, strict=True)
    x = torch.randn(4, 13)
    torch.testing.assert_close(dense(x), model(x))
    plain = sparsify(mlp())
    plain.load_state_dict(load_file(path), strict=True)
    assert torch.equal(plain[0].mask, model[0].mask)


def test_plain_safetensors_file_loads_back_sparse(tmp_path):
    model = pruned_mlp()
    path = tmp_path / "plain.safetensors"
    save_file(model.state_dict(), path)  # no masks in the file
    fresh = sparsify(mlp())
    fresh.load_state_dict(load_file(path), strict=True)
    for a, b in zip(masks(model).values(), masks(fresh).values()):
        assert torch.equal(a, b)  # random weights: the kept ones are non-zero


def test_forgotten_mask_optimizer_then_save_ends_sparse():
    """Adam moments from before the prune move pruned weights; state_dict() still saves zeros there."""
    torch.manual_seed(0)
    model = sparsify(mlp())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 13), torch.randn(16, 5)
    for step in range(4):
        if step == 2:
            prune_(model, 0.8, allocation="uniform")
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    assert any((u.weight[~u.mask] != 0).any() for _, u in sparse_modules(model)), "the scenario must drift"
    with pytest.warns(UserWarning, match="non-zero weights at pruned positions"):
        sparsity_report(model)
    sd = roundtrip(model.state_dict())
    for name, unit in sparse_modules(model):
        assert (sd[f"{name}.weight"][~unit.mask] == 0).all()
    dense = mlp()
    dense.load_state_dict(sd, strict=True)
    torch.testing.assert_close(dense(x), model(x), rtol=1e-6, atol=1e-6)
    assert (model[0].weight[~model[0].mask] != 0).any(), "state_dict() must not modify the layer"


def test_dense_checkpoint_into_sparse_model_without_zeros_is_dense():
    model = sparsify(mlp())
    prune_(model, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_state_dict(mlp().state_dict())
    assert sparsity_report(model).density == 1.0
    assert se.sparsity_report(model).all_density == 1.0
