"""Issue 11 items 1-3, 6, 7, 8, 10, 11 for the layers: each test reproduces a report and failed on
the code before the fix (they import only what existed then, so that they can be run against it).
"""
import pytest
import torch
from torch import nn

from sparse_engine import (SparseLinear, densify, mask_optimizer, masked_linear, pack_mask, prune_, sparse_modules,
                           sparsify, sparsity_report)
from sparse_engine.models import build_model, example_batch
from sparse_checkpoints import assert_consistent, masks, mlp, pruned_mlp, roundtrip


# ---- issue 11 items 1-3: loads that leave every layer consistent -------------------------------

def test_corrupt_masks_are_reported_as_unexpected_keys_and_layers_stay_consistent():
    """Item 1: a saved mask of the wrong shape, or not a tensor, raised mid-load (AttributeError for a
    list) with the weight replaced but not the mask, and later layers never loaded."""
    source = pruned_mlp()
    sd = source.state_dict()
    sd._metadata["0"]["sparse_engine.mask_bits"] = torch.zeros(3, 1, dtype=torch.int32)
    sd._metadata["2"]["sparse_engine.mask_bits"] = [1, 2, 3]
    target = sparsify(mlp())
    with pytest.warns(UserWarning) as warned, pytest.raises(RuntimeError) as err:
        target.load_state_dict(sd, strict=True)
    message = str(err.value)
    assert '"0.mask_bits"' in message and '"2.mask_bits"' in message  # one error naming every bad layer
    reasons = " ".join(str(w.message) for w in warned)
    assert "'0.weight'" in reasons and "(3, 1)" in reasons and "'2.weight'" in reasons and "got list" in reasons
    assert_consistent(target)
    torch.testing.assert_close(target[4].weight, source[4].weight)  # the layer after the bad ones was loaded
    assert torch.equal(target[4].mask, source[4].mask)

    target = sparsify(mlp())
    with pytest.warns(UserWarning, match="saved mask for '0.weight'"):
        result = target.load_state_dict(sd, strict=False)
    assert "0.mask_bits" in result.unexpected_keys and "2.mask_bits" in result.unexpected_keys
    assert_consistent(target)
    assert torch.equal(target[0].mask, source[0].mask)  # derived from the loaded weight's zeros


def test_dense_checkpoint_of_another_architecture_keeps_unloaded_masks():
    """Item 2: torch reports the size mismatch and leaves 2.weight as it was; its mask must stay too."""
    target = pruned_mlp()
    before = masks(target)
    weight_before = target[2].weight.detach().clone()
    other = mlp((13, 9, 6, 5)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch for 2.weight"):
        target.load_state_dict(other)
    assert torch.equal(target[2].mask, before["2"])
    assert torch.equal(target[2].weight, weight_before)
    assert_consistent(target)


def test_sparse_checkpoint_of_another_architecture_shows_torchs_report():
    """Item 3: the error named no layer ('saved mask of SparseLinear: ...') and hid torch's size mismatch."""
    source = pruned_mlp(widths=(13, 9, 6, 5))
    target = pruned_mlp()
    with pytest.raises(RuntimeError) as err:
        target.load_state_dict(source.state_dict())
    message = str(err.value)
    assert "size mismatch for 2.weight" in message and "size mismatch for 4.weight" in message
    assert "saved mask" not in message
    assert_consistent(target)


# ---- issue 11 item 6: tied weights ---------------------------------------------------------------

def test_tied_weights_share_one_mask_counted_once():
    """Item 6: the embedding and the tied output layer got different masks; one reported a zero weight as kept."""
    model = sparsify(build_model("tied_lm", vocab_size=64, dim=16))
    names = [n for n, _ in sparse_modules(model)]
    assert "embed" in names and "decoder" not in names  # one unit for the shared Parameter
    prune_(model, 0.6, allocation="uniform")
    assert torch.equal(model.embed.mask, model.decoder.mask)
    assert_consistent(model)
    kept = model.decoder.mask
    assert (model.decoder.weight[kept] != 0).all()
    report = sparsity_report(model)
    assert report.numel == sum(u.weight.numel() for _, u in sparse_modules(model))
    assert model.embed.weight.numel() == report.layers[names.index("embed")].numel
    # set_mask through either layer sets it for both; a step keeps them in agreement.
    mask = torch.rand(model.decoder.weight.shape) < 0.3
    model.decoder.set_mask(mask)
    assert torch.equal(model.embed.mask, mask)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask_optimizer(opt, model)
    x, y = example_batch("tied_lm", 2, vocab_size=64)
    nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
    assert (model.embed.weight.grad[~mask] == 0).all()
    opt.step()
    assert_consistent(model)
    # Converting only one of the two layers would leave the other using the weight unmasked.
    with pytest.raises(ValueError, match="shares its Parameter 'weight' with 'embed.weight'"):
        sparsify(build_model("tied_lm", vocab_size=64, dim=16), include="decoder")


def test_tied_weights_checkpoint_roundtrip_and_dense_reload():
    model = sparsify(build_model("tied_lm", vocab_size=64, dim=16))
    prune_(model, 0.5, allocation="uniform")
    with torch.no_grad():  # a kept weight that is exactly 0: the saved mask, not the zeros, must decide
        model.embed.weight[tuple(model.embed.mask.nonzero()[0])] = 0.0
    sd = roundtrip(model.state_dict())
    fresh = sparsify(build_model("tied_lm", vocab_size=64, dim=16))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.embed.mask, model.embed.mask) and fresh.decoder.weight is fresh.embed.weight
    dense = build_model("tied_lm", vocab_size=64, dim=16)
    dense.load_state_dict(sd, strict=True)
    x, _ = example_batch("tied_lm", 2, vocab_size=64)
    torch.testing.assert_close(dense(x), model(x))


# ---- issue 11 item 7: meta-device models -----------------------------------------------------------

def test_meta_model_loads_with_assign_and_runs():
    """Item 7: load_state_dict(sd, assign=True) left mask_bits on the meta device; the model could not run."""
    source = sparsify(build_model("tied_lm", vocab_size=64, dim=16))
    prune_(source, 0.5, allocation="uniform")
    with torch.no_grad():
        source.embed.weight[tuple(source.embed.mask.nonzero()[0])] = 0.0
    with torch.device("meta"):
        model = build_model("tied_lm", vocab_size=64, dim=16)
    sparsify(model)
    model.load_state_dict(source.state_dict(), assign=True)
    for name, buf in model.named_buffers():
        assert buf.device.type == "cpu", name
    assert model.decoder.weight is model.embed.weight, "assign=True must not untie the model"
    for (_, a), (_, b) in zip(sparse_modules(source), sparse_modules(model)):
        assert torch.equal(a.mask, b.mask)
    x, _ = example_batch("tied_lm", 2, vocab_size=64)
    torch.testing.assert_close(model(x), source(x))


def test_prune_on_a_meta_model_is_a_clear_error():
    """Item 7: prune_ failed with 'Tensor.item() cannot be called on meta tensors'."""
    with torch.device("meta"):
        model = mlp()
    sparsify(model)
    with pytest.raises(ValueError, match=r"meta device .* load the weights first"):
        prune_(model, 0.9)
    with pytest.raises(ValueError, match="meta device"):
        sparsity_report(model)


# ---- issue 11 item 8: empty input dimension ---------------------------------------------------------

def test_sparse_linear_with_no_inputs_returns_the_bias():
    """Item 8: SparseLinear(0, N) failed in forward ('cannot reshape tensor of 0 elements')."""
    dense = nn.Linear(0, 3)
    layer = sparsify(nn.Sequential(nn.Linear(0, 3)))[0]
    with torch.no_grad():
        layer.bias.copy_(dense.bias)
    x = torch.randn(4, 0, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, dense(x))
    y.sum().backward()
    assert x.grad.shape == (4, 0) and layer.bias.grad.shape == (3,)
    torch.testing.assert_close(SparseLinear(0, 5, bias=False)(torch.randn(2, 7, 0)), torch.zeros(2, 7, 5))


def test_masked_linear_with_k_zero():
    """Item 8: masked_linear with K = 0 failed the same way."""
    w, b = torch.randn(6, 0), torch.randn(6)
    bits = pack_mask(torch.ones(6, 0, dtype=torch.bool))
    torch.testing.assert_close(masked_linear(torch.randn(3, 0), w, bits, b), b.expand(3, 6))
    torch.testing.assert_close(masked_linear(torch.randn(2, 3, 0), w, bits), torch.zeros(2, 3, 6))


# ---- issue 11 items 10 and 11: errors that name the argument ----------------------------------------

def test_bad_model_level_arguments_name_the_argument():
    """Item 10: 'int' object is not iterable; AttributeError on a string model."""
    with pytest.raises(TypeError, match="include: expected None, a name pattern"):
        sparsify(mlp(), include=3)
    with pytest.raises(TypeError, match="exclude: expected None, a name pattern"):
        prune_(sparsify(mlp()), 0.7, exclude=3)
    for fn in (sparse_modules, sparsity_report, densify, sparsify):
        with pytest.raises(TypeError, match="model: expected an nn.Module, got str"):
            fn("x")


def test_bad_backend_is_refused_at_construction():
    """Item 11: SparseLinear(4, 3, backend='cutlass') was accepted and failed only at the first forward."""
    with pytest.raises(ValueError, match="backend: expected one of"):
        SparseLinear(4, 3, backend="cutlass")
