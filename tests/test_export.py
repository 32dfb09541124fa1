"""Export (issue 10 item 5): to_sparse round trips and memory, torch.export of a sparse model."""
import copy

import pytest
import torch
from torch import nn

from sparse_engine import prune_, sparse_modules, sparsify, to_sparse
from sparse_engine.export import SparseTensorLinear, block_size_of
from sparse_engine.models import build_model, example_batch


def pruned(name="fashion_mlp", sparsity=0.9, **kwargs):
    model = sparsify(build_model(name)).eval()
    prune_(model, sparsity, **kwargs)
    return model


def index_bytes(t):
    return (t.crow_indices().numel() + t.col_indices().numel()) * 4  # int32 indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_csr_round_trip_and_memory(dtype):
    model = pruned().to(dtype)
    x, _ = example_batch("fashion_mlp", 5)
    x = x.to(dtype)
    with torch.no_grad():
        expected = model(x)
    kept = {name: int(u.mask.sum()) for name, u in sparse_modules(model)}
    report = to_sparse(model, "csr")
    assert all(isinstance(model[i], SparseTensorLinear) for i in (1, 3, 5))
    assert not list(model.buffers()) or all(b.layout == torch.sparse_csr or b.dim() == 1 for b in model.buffers())
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **({} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}))
    for layer in report.layers:
        w = model.get_submodule(layer.name).weight
        size = dtype.itemsize
        assert w.values().numel() <= kept[layer.name]  # kept weights that are exactly 0 are not stored
        assert layer.bytes == w.values().numel() * size + index_bytes(w)
        assert layer.dense_bytes == w.shape[0] * w.shape[1] * size
    assert report.bytes < 0.25 * report.dense_bytes  # 90% sparse: values + int32 column indices ~ 0.2x of fp32
    assert "total" in str(report)


def test_bsr_block_size_from_the_mask_structure():
    model = pruned("second_order_mlp", 0.75, granularity="4x4", exclude="5")
    x, _ = example_batch("second_order_mlp", 3)
    with torch.no_grad():
        expected = model(x)
    assert block_size_of(model[1].mask) == 4 and block_size_of(torch.rand(8, 8) < 0.5) is None
    report = to_sparse(model, "bsr")
    layouts = {layer.name: layer.layout for layer in report.layers}
    assert layouts == {"1": "bsr", "3": "bsr", "5": "bsr"}
    assert model[1].weight.values().shape[1:] == (4, 4)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)


def test_bsr_errors_leave_the_model_unchanged():
    model = pruned()  # unstructured: no block structure
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="layout 'bsr': layer '1' has no square block structure"):
        to_sparse(model, "bsr")
    with pytest.raises(ValueError, match="blocksize: .* does not divide layer '1'"):
        to_sparse(model, "bsr", blocksize=(4, 3))
    with pytest.raises(ValueError, match="blocksize: only used with layout='bsr'"):
        to_sparse(model, "csr", blocksize=2)
    with pytest.raises(ValueError, match="layout: expected one of"):
        to_sparse(model, "coo")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert len(sparse_modules(model)) == 3
    x, _ = example_batch("fashion_mlp", 2)
    with torch.no_grad():
        expected = model(x)
    report = to_sparse(model, "bsr", blocksize=2)  # given: blocks holding a kept weight are stored
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    assert all(layer.layout == "bsr" for layer in report.layers)


def test_semi_structured_needs_cuda_with_a_clear_error():
    model = pruned(sparsity=0.5, granularity="2:4")
    with pytest.raises(ValueError, match="layout 'semi_structured': .* CUDA only"):
        to_sparse(model, "semi_structured")
    assert len(sparse_modules(model)) == 3  # unchanged


@pytest.mark.gpu
def test_semi_structured_round_trip_cuda():
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128)).cuda().half()
    sparsify(model)
    prune_(model, 0.5, granularity="2:4")
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        expected = model(x)
    report = to_sparse(model, "semi_structured")
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert report.bytes < report.dense_bytes


def test_dense_layout_and_non_linear_layers_are_densified():
    model = pruned("fashion_cnn")
    x, _ = example_batch("fashion_cnn", 2)
    with torch.no_grad():
        expected = model(x)
    report = to_sparse(model, "csr")
    layouts = {layer.name: layer.layout for layer in report.layers}
    assert layouts == {"9": "csr", "11": "csr", "0.weight": "dense", "4.weight": "dense"}
    assert type(model[0]) is nn.Conv2d
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
    model = pruned()
    report = to_sparse(model, "dense")
    assert report.bytes == report.dense_bytes and type(model[1]) is nn.Linear


def test_torch_export_of_a_sparse_model():
    model = pruned("fashion_cnn")
    x, _ = example_batch("fashion_cnn", 2)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("sparse_engine.masked_conv2d" in op for op in ops) and any("sparse_engine.masked_linear" in op for op in ops)
