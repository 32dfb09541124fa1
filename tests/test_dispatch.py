"""sparse_engine.ops.dispatch: every implementation of the masked ops against the fp64 reference,
measured choices cached and persisted, pinning, and the compile/autocast paths."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from sparse_engine import pack_mask, sparsify, sparse_modules
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
    # one dY for every dtype: drawn in float64, then rounded (randn_like draws other values per dtype)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), gy)
    return y, gx, gw, gb


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("impl", dispatch.IMPLEMENTATIONS)
@pytest.mark.parametrize("name", list(OPS))
def test_each_implementation_matches_the_reference(name, impl, dtype):
    op, ref, make, kwargs = OPS[name]
    inputs = make(dtype)

    def run(fn, cast):
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
    assert impl in dispatch.IMPLEMENTATIONS and key.startswith("masked_linear|cpu|bwd|(2, 7, 97):float32|(33, 97)")
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


def test_checks_still_run_after_a_cached_call(auto):
    """A cached key lets masked_linear skip its checks; anything outside that key is checked again."""
    x, w, bits, b = _linear_inputs()
    masked_linear(x, w, bits, b)
    assert dispatch.lookup("masked_linear", (x, w, bits, b), ("triton",)) in dispatch.IMPLEMENTATIONS
    with pytest.raises(ValueError, match="backend: expected one of"):
        masked_linear(x, w, bits, b, backend="cutlass")
    with pytest.raises(TypeError, match="weight: expected a torch.Tensor, got list"):
        masked_linear(x, w.tolist(), bits, b)
    with pytest.raises(TypeError, match="bias: expected a torch.Tensor or None, got list"):
        masked_linear(x, w, bits, b.tolist())
    with pytest.raises(ValueError, match="mask_bits: expected shape"):
        masked_linear(x, w, bits[:, :2], b)
    with pytest.raises(TypeError, match="x: expected dtype torch.float32"):
        masked_linear(x.double(), w, bits, b)
    dispatch.pin("fused")
    assert dispatch.lookup("masked_linear", (x, w, bits, b), ("triton",)) is None  # a pin goes through choose


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


# ---- masked_weight_for_op: the weight itself where its pruned entries are already zeros ----------

def _runs_masked_weight_op(fn) -> bool:
    """Whether ``fn()`` ran the op ``sparse_engine::masked_weight`` (the copy W*M)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return any(e.name == "sparse_engine::masked_weight" for e in prof.events())


def _pruned_are_zero_ref(t, bits):
    return bool((t[~masked_weight_ref(torch.ones_like(t), bits).bool()] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (5, 32), (37, 101), (6, 3, 5, 7), (211, 1000)])
def test_pruned_are_zero_matches_reference(shape, dtype):
    from sparse_engine import _C
    g = torch.Generator().manual_seed(sum(shape))
    keep = torch.rand(shape, generator=g) < 0.3
    bits = pack_mask(keep)
    w = torch.randn(shape, generator=g).to(dtype)
    assert _C.pruned_are_zero(w, bits) == _pruned_are_zero_ref(w, bits)
    zeroed = w * keep
    assert _C.pruned_are_zero(zeroed, bits) and _pruned_are_zero_ref(zeroed, bits)
    zeroed[~keep] = -0.0  # signed zeros are zeros
    assert _C.pruned_are_zero(zeroed, bits)
    pruned = (~keep).reshape(-1).nonzero().squeeze(1)
    if pruned.numel():
        # one non-zero, tiny or not a number, at the first, a random and the last pruned position
        for pos in {int(pruned[0]), int(pruned[torch.randint(pruned.numel(), (1,), generator=g)]), int(pruned[-1])}:
            for value in (1e-3 if dtype != torch.float64 else 1e-300, float("nan"), float("-inf")):
                bad = zeroed.clone()
                bad.view(-1)[pos] = value
                assert not _C.pruned_are_zero(bad, bits), (pos, value)
    if len(shape) == 2:  # a transposed view: strides (1, rows)
        t = zeroed.t().contiguous().t()
        assert not t.is_contiguous() or shape[0] == 1
        assert _C.pruned_are_zero(t, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(OPS))
def test_materialized_reads_the_weight_itself_when_pruned_entries_are_zeros(name, dtype):
    """The "materialized" implementation skips the copy W*M when W's pruned entries are already
    zeros; results and gradients stay those of the reference, and a pruned entry that is not zero
    (written through .data, say) sends it back to the copy."""
    op, ref, make, kwargs = OPS[name]
    x, w, bits, b = make(dtype)
    keep = masked_weight_ref(torch.ones_like(w), bits).bool()
    dispatch.pin("materialized")
    for pruned_value in (0.0, 3.0):
        weight = (w.detach() * keep).masked_fill(~keep, pruned_value).requires_grad_()
        expected, torch_own = (_grads(ref, (x.detach().to(d).requires_grad_(), (w * keep).detach().to(d).requires_grad_(),
                                            bits, b.detach().to(d).requires_grad_()), kwargs)
                               for d in (torch.float64, dtype))
        got = []
        copied = _runs_masked_weight_op(lambda: got.extend(_grads(op, (x, weight, bits, b), kwargs)))
        assert copied == (pruned_value != 0)
        for what, g, e, own in zip(("y", "dx", "dw", "db"), got, expected, torch_own):
            if dtype == torch.float64:
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=what)
            else:
                assert_matches_ref(g, e, own, dtype)
        assert (got[2][~keep] == 0).all() and not got[2][~keep].signbit().any()  # exact +0 at pruned dW


@pytest.mark.parametrize("name", list(OPS))
def test_weight_itself_gradcheck_and_double_backward(name):
    op, _, make, kwargs = OPS[name]
    x, w, bits, b = make(torch.float64)
    w = (w.detach() * masked_weight_ref(torch.ones_like(w), bits)).requires_grad_()
    dispatch.pin("materialized")
    fn = lambda x, w, b: op(x, w, bits, b, **kwargs)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_recorded_graphs_keep_the_copy():
    """Where a graph is recorded, it must not depend on this call's weights: under a
    TorchDispatchMode (make_fx records through one) the op that builds W*M runs even while the
    pruned entries are zeros."""
    layer = sparsify(nn.Sequential(nn.Linear(40, 9)))[0]
    layer.set_mask(torch.rand(9, 40) < 0.5)
    x = torch.randn(4, 40)
    dispatch.pin("materialized")
    assert not _runs_masked_weight_op(lambda: layer(x))  # eager: W itself

    class Seen(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    seen = []
    with Seen():
        layer(x)
    assert "sparse_engine.masked_weight" in seen


def test_layers_ignore_pruned_entries_written_through_data():
    """``weight.data`` writes bump no version counter: the check reads the data, so a layer whose
    pruned entries were overwritten still computes with W*M."""
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(9, 7), nn.Conv1d(1, 2, 3), nn.LSTM(5, 4)))
    for _, unit in sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.5)
    lin, conv, lstm = model
    x = torch.randn(3, 9)
    seq = torch.randn(6, 2, 5)
    for impl in dispatch.IMPLEMENTATIONS:
        dispatch.pin(impl)
        before = (lin(x), conv(x[:, None, :]), lstm(seq)[0])
        for _, unit in sparse_modules(model):
            unit.weight.data[~unit.mask] = 7.0
        after = (lin(x), conv(x[:, None, :]), lstm(seq)[0])
        for _, unit in sparse_modules(model):
            unit.weight.data[~unit.mask] = 0.0
        for a, bb in zip(before, after):
            torch.testing.assert_close(a, bb, rtol=0, atol=0)


def test_weight_itself_gradient_is_masked_in_place_only_when_nobody_else_sees_it():
    """The backward of ``masked_weight_for_op`` masks the incoming gradient in place only when it is the
    node's alone (a fresh result of the dense op): gradients shared with other tensors come out right."""
    from sparse_engine import _C
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(6, 40, generator=g) < 0.5
    bits = pack_mask(keep)
    w = (torch.randn(6, 40, generator=g) * keep).requires_grad_()
    x = torch.randn(3, 40, generator=g)
    dense = torch.ones(3, 6).t() @ x  # d sum(x W^T) / dW
    h = torch.randn(6, 40, requires_grad=True)  # an add hands one gradient tensor to both of its inputs
    torch.nn.functional.linear(x, h + _C.masked_weight_for_op(w, bits)).sum().backward()
    torch.testing.assert_close(h.grad, dense, rtol=0, atol=0)
    torch.testing.assert_close(w.grad, dense * keep, rtol=0, atol=0)
    outputs = torch.ones(6, 40)  # the caller's grad_outputs stay as they are
    (gw,) = torch.autograd.grad(_C.masked_weight_for_op(w, bits), (w,), outputs)
    assert (outputs == 1).all() and (gw == keep).all()
    alias = _C.masked_weight_for_op(w, bits)  # a gradient torch.autograd.grad returns is not masked
    gw, ga = torch.autograd.grad(torch.nn.functional.linear(x, alias).sum(), (w, alias))
    torch.testing.assert_close(ga, dense, rtol=0, atol=0)
    torch.testing.assert_close(gw, dense * keep, rtol=0, atol=0)
    assert not _C.masked_weight_for_op(w.detach().int(), bits).data_ptr() == w.data_ptr()  # ints: the copy


@pytest.mark.parametrize("layer, x", [(nn.Linear(50, 7), (4, 50)), (nn.Linear(50, 7), (2, 3, 50)),
                                      (nn.Conv2d(3, 4, 3), (2, 3, 6, 6)), (nn.Conv3d(2, 3, 2), (2, 2, 3, 3, 3)),
                                      (nn.LSTM(5, 4), (6, 2, 5))], ids=["linear", "linear-3d", "conv2d", "conv3d", "lstm"])
def test_weight_itself_no_copy_forward_or_backward(layer, x):
    """On the layers' own path (zero pruned entries), neither the forward nor the backward copies W*M: the
    weight is read as it is and its fresh gradient masked in place (torch's autograd must keep handing the
    node a gradient that only it holds)."""
    dispatch.pin("materialized")
    layer = sparsify(nn.Sequential(layer))[0]
    for _, unit in sparse_modules(layer):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.5)

    def step():
        out = layer(torch.randn(x))
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    assert not _runs_masked_weight_op(step)
    for _, unit in sparse_modules(layer):
        assert (unit.weight.grad[~unit.mask] == 0).all() and not unit.weight.grad[~unit.mask].signbit().any()
    name = next(n for n, _ in layer.named_parameters() if n.startswith("weight"))
    with torch.no_grad():  # the public effective_weight stays a copy, whatever the forward reads
        assert layer.effective_weight(name).data_ptr() != getattr(layer, name).data_ptr()
