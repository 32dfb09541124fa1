"""sparse_engine.ops.dispatch: every implementation of the masked ops against the fp64 reference,
measured choices cached and persisted, pinning, and the compile/autocast paths."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparse_engine import SparseLinear, pack_mask, sparsify, sparse_modules
from sparse_engine.ops import dispatch, masked_conv2d, masked_conv2d_ref, masked_linear, masked_linear_ref
from sparse_engine.ops.masked_weight import masked_weight, masked_weight_ref
from tolerance import assert_matches_ref


@pytest.fixture
def auto():
    """Measure (no pin) with an empty cache; restores the cache afterwards."""
    saved = dispatch.choices()
    dispatch.clear()
    dispatch.pin(None)
    yield
    dispatch.clear()
    dispatch._cache.update(saved)


def _linear_inputs(dtype=torch.float32):
    x = torch.randn(2, 7, 97, dtype=dtype, requires_grad=True)
    w = torch.randn(33, 97, dtype=dtype, requires_grad=True)
    b = torch.randn(33, dtype=dtype, requires_grad=True)
    return x, w, pack_mask(torch.rand(33, 97) < 0.4), b


def _conv_inputs(dtype=torch.float32):
    x = torch.randn(3, 6, 9, 11, dtype=dtype, requires_grad=True)
    w = torch.randn(10, 3, 3, 3, dtype=dtype, requires_grad=True)
    b = torch.randn(10, dtype=dtype, requires_grad=True)
    return x, w, pack_mask(torch.rand(10, 27) < 0.4), b


OPS = {
    "linear": (masked_linear, masked_linear_ref, _linear_inputs, {}),
    "conv2d": (masked_conv2d, masked_conv2d_ref, _conv_inputs, dict(stride=(2, 1), padding=1, groups=2)),
}


def _grads(op, inputs, kwargs):
    x, w, bits, b = inputs
    y = op(x, w, bits, b, **kwargs)
    gy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    return y, gx, gw, gb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("impl", dispatch.IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(OPS))
def test_each_implementation_matches_the_reference(name, impl, dtype):
    op, ref, make, kwargs = OPS[name]
    inputs = make(dtype)

    def run(fn, cast):
        torch.manual_seed(1)  # the same dY
        return _grads(fn, [cast(t).detach().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                           for t in inputs], kwargs)

    expected = run(ref, lambda t: t.double())
    torch_own = run(ref, lambda t: t)  # torch's own error in this dtype
    dispatch.pin(impl)
    got = run(op, lambda t: t)
    for what, g, e, own in zip(("y", "dx", "dw", "db"), got, expected, torch_own):
        assert g.dtype == dtype, what
        if dtype == torch.float64:
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=what)
        else:
            assert_matches_ref(g, e, own, dtype)
    mask = masked_weight_ref(torch.ones_like(inputs[1]), inputs[2]).bool()
    assert (got[2][~mask] == 0).all() and not got[2][~mask].signbit().any()  # exact +0 at pruned dW


def test_implementations_give_exact_zero_grads_where_dy_is_nan():
    x, w, bits, b = _linear_inputs()
    mask = masked_weight_ref(torch.ones_like(w), bits).bool()
    for impl in dispatch.IMPLEMENTATIONS:
        dispatch.pin(impl)
        y = masked_linear(x, w, bits, b)
        gy = torch.randn_like(y)
        gy[0, 0, 0] = float("nan")
        (gw,) = torch.autograd.grad(y, (w,), gy)
        assert (gw[~mask] == 0).all(), impl


def test_pin_picks_the_implementation(monkeypatch):
    x, w, bits, b = _linear_inputs()
    seen = []
    fused = torch.ops.sparse_engine.masked_linear
    monkeypatch.setattr(torch.ops.sparse_engine, "masked_linear", lambda *a: seen.append("fused") or fused(*a))
    dispatch.pin("materialized")
    masked_linear(x, w, bits, b)
    assert seen == []
    dispatch.pin("fused")
    masked_linear(x, w, bits, b)
    assert seen == ["fused"]
    assert dispatch.choose("masked_linear", None, ()) == "fused"  # pinned: neither measured nor looked up


def test_measured_once_and_cached(auto, monkeypatch):
    x, w, bits, b = _linear_inputs()
    calls = []
    measure = dispatch._measure
    monkeypatch.setattr(dispatch, "_measure", lambda *a: calls.append(1) or measure(*a))
    y = masked_linear(x, w, bits, b)
    y2 = masked_linear(x, w, bits, b)
    assert len(calls) == 1
    (key, impl), = dispatch.choices().items()
    assert impl in dispatch.IMPLEMENTATIONS and key.startswith("masked_linear|cpu|bwd|(14, 97):float32|(33, 97)")
    torch.testing.assert_close(y, y2)
    assert x.grad is None and w.grad is None  # measuring did not touch the caller's tensors
    with torch.no_grad():
        masked_linear(x, w, bits, b)  # forward only: another key
    assert len(calls) == 2 and any("|fwd|" in k for k in dispatch.choices())


def test_cache_persistence_round_trip(auto, tmp_path, monkeypatch):
    x, w, bits, b = _conv_inputs()
    masked_conv2d(x, w, bits, b, padding=1, groups=2)
    masked_linear(*_linear_inputs())
    saved = dispatch.choices()
    assert len(saved) == 2
    path = tmp_path / "dispatch.json"
    dispatch.save(path)
    dispatch.clear()
    assert dispatch.choices() == {}
    dispatch.load(path)
    assert dispatch.choices() == saved
    monkeypatch.setattr(dispatch, "_measure", lambda *a: pytest.fail("a loaded choice was measured again"))
    masked_conv2d(x, w, bits, b, padding=1, groups=2)


def test_bad_values_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"implementation: expected one of \('fused', 'materialized'\)"):
        dispatch.pin("dense")
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "choices": {"k": "cudnn"}}')
    with pytest.raises(ValueError, match="path: .*bad.json.*choice for 'k'"):
        dispatch.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="path: .* is not a dispatch cache"):
        dispatch.load(bad)
    run = subprocess.run([sys.executable, "-c", "import sparse_engine"], capture_output=True, text=True,
                         env={**os.environ, dispatch.ENV_VAR: "fastest"})
    assert run.returncode != 0 and "SPARSE_ENGINE_MASKED_IMPL: expected one of" in run.stderr


def test_env_var_pins():
    code = "from sparse_engine.ops import dispatch; print(dispatch.pinned())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, dispatch.ENV_VAR: "materialized"})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "materialized"


def _model():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 9)))
    for _, unit in sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.5)
    return model


def test_compile_fullgraph_with_measured_dispatch(auto):
    model, x = _model(), torch.randn(2, 3, 7, 7)
    eager = model(x)  # measured here, eagerly
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    for _, unit in sparse_modules(model):
        assert (unit.weight.grad[~unit.mask] == 0).all()


@pytest.mark.parametrize("impl", dispatch.IMPLEMENTATIONS)
def test_autocast(impl):
    dispatch.pin(impl)
    model, x = _model(), torch.randn(2, 3, 7, 7)
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    for _, unit in sparse_modules(model):
        assert unit.weight.grad.dtype == torch.float32 and (unit.weight.grad[~unit.mask] == 0).all()


def test_masked_weight_op():
    w = torch.randn(7, 3, 5, dtype=torch.float64, requires_grad=True)
    bits = pack_mask(torch.rand(7, 3, 5) < 0.5)
    torch.library.opcheck(torch.ops.sparse_engine.masked_weight.default, (w, bits))
    assert torch.autograd.gradcheck(lambda t: masked_weight(t, bits), (w,))
    out = torch.compile(lambda t: masked_weight(t, bits) * 2, fullgraph=True)(w)
    torch.testing.assert_close(out, 2 * masked_weight_ref(w, bits), rtol=0, atol=0)
    nan = torch.full((7, 3, 5), float("nan"))
    assert not masked_weight(nan, bits)[~masked_weight_ref(torch.ones(7, 3, 5), bits).bool()].isnan().any()
