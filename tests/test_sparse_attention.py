"""SparseMultiheadAttention and SparseBilinear on the fused masked linear op: every option of the
dense layer against the dense layer with the masked weights (float64, forward and backward), the
number of fused calls per case, compile and CPU bf16 autocast."""
import copy

import pytest
import torch
from torch import nn

import sparse_engine.nn.masked_module as masked_module
import sparse_engine.nn.sparse_attention as sparse_attention
from sparse_engine import densify, sparse_modules, sparsify

E, HEADS, L, S, B = 12, 3, 5, 7, 2


def _masks(bsz=B, tgt=L, src=S, heads=HEADS):
    g = torch.Generator().manual_seed(7)
    padding = torch.rand(bsz, src, generator=g) < 0.3
    padding[:, 0] = False  # every query sees at least one key
    causal = torch.triu(torch.ones(tgt, src, dtype=torch.bool), 1)
    return {
        "kpm_bool": padding,
        "kpm_float": torch.where(padding, -1e9, 0.0).double(),
        "causal": causal,
        "mask3d_float": torch.randn(bsz * heads, tgt, src, generator=g, dtype=torch.float64),
    }


# id -> (nn.MultiheadAttention kwargs, input kind, forward kwargs from the masks, training)
# input kinds: "self" (query is key is value), "kv" (key is value), "qkv" (three tensors), "unbatched" (self)
CASES = {
    "self-weights-avg": ({}, "self", lambda m: {}, False),
    "self-batch-first-no-weights": ({"batch_first": True}, "self", lambda m: {"need_weights": False}, False),
    "unbatched-no-weights": ({}, "unbatched", lambda m: {"need_weights": False}, False),
    "unbatched-per-head-weights": ({}, "unbatched", lambda m: {"average_attn_weights": False}, False),
    "kpm-bool-no-weights": ({}, "kv", lambda m: {"key_padding_mask": m["kpm_bool"], "need_weights": False}, False),
    "kpm-float-per-head": ({}, "kv", lambda m: {"key_padding_mask": m["kpm_float"], "average_attn_weights": False},
                           False),
    "causal-is-causal": ({"batch_first": True}, "self",
                         lambda m: {"attn_mask": m["causal"][:, :L], "is_causal": True, "need_weights": False}, False),
    "causal-and-kpm-weights": ({}, "self", lambda m: {"attn_mask": m["causal"][:, :L],
                                                      "key_padding_mask": m["kpm_bool"][:, :L]}, False),
    "mask3d-float-qkv": ({}, "qkv", lambda m: {"attn_mask": m["mask3d_float"], "need_weights": False}, False),
    "kdim-vdim-no-bias": ({"kdim": 5, "vdim": 7, "bias": False}, "qkv",
                          lambda m: {"key_padding_mask": m["kpm_bool"]}, False),
    "bias-kv-zero-attn-no-weights": ({"add_bias_kv": True, "add_zero_attn": True}, "kv",
                                     lambda m: {"key_padding_mask": m["kpm_bool"], "attn_mask": m["causal"],
                                                "need_weights": False}, False),
    "bias-kv-zero-attn-weights": ({"add_bias_kv": True, "add_zero_attn": True, "batch_first": True}, "qkv",
                                  lambda m: {"attn_mask": m["causal"]}, False),
    "dropout-train-no-weights": ({"dropout": 0.3}, "self", lambda m: {"need_weights": False}, True),
    "dropout-train-weights": ({"dropout": 0.3, "kdim": 5, "vdim": 7}, "qkv", lambda m: {}, True),
}
# Fused masked_linear calls for the in-projection per input kind (out_proj is SparseLinear's own call).
IN_PROJ_CALLS = {"self": 1, "unbatched": 1, "kv": 2, "qkv": 3}


def _inputs(kind, kwargs):
    batch_first = kwargs.get("batch_first", False)

    def seq(n, d):
        return torch.randn((B, n, d) if batch_first else (n, B, d), dtype=torch.float64, requires_grad=True)

    if kind in ("self", "unbatched"):
        x = torch.randn(L, E, dtype=torch.float64, requires_grad=True) if kind == "unbatched" else seq(L, E)
        return [x], (x, x, x)
    q = seq(L, E)
    if kind == "kv":
        kv = seq(S, E)
        return [q, kv], (q, kv, kv)
    k, v = seq(S, kwargs.get("kdim", E)), seq(S, kwargs.get("vdim", E))
    return [q, k, v], (q, k, v)


def _pair(kwargs, density=0.5):
    torch.manual_seed(0)
    sparse = sparsify(nn.MultiheadAttention(E, HEADS, **kwargs).double())
    for _, unit in sparse_modules(sparse):
        unit.set_mask(torch.rand(unit.weight.shape) < density)
    if sparse.bias_k is not None:
        with torch.no_grad():
            sparse.bias_k.normal_(), sparse.bias_v.normal_()
    return sparse, densify(copy.deepcopy(sparse))


@pytest.mark.parametrize("case", list(CASES))
def test_attention_matches_dense_float64(case, monkeypatch):
    kwargs, kind, call_kwargs, training = CASES[case]
    sparse, dense = _pair(kwargs)
    assert type(dense) is nn.MultiheadAttention
    sparse.train(training), dense.train(training)
    leaves, args = _inputs(kind, kwargs)
    dense_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    dense_args = tuple(dense_leaves[[id(x) for x in leaves].index(id(a))] for a in args)  # same "is" relations
    fw = call_kwargs(_masks())

    calls = []

    def spy(x, weight, mask_bits, bias=None, *, backend="triton"):
        calls.append(tuple(weight.shape))
        return masked_linear(x, weight, mask_bits, bias, backend=backend)

    def no_materialised_weight(*args):
        raise AssertionError("the in-projection must use the fused op, not W*M")

    masked_linear = sparse_attention.masked_linear
    monkeypatch.setattr(sparse_attention, "masked_linear", spy)
    monkeypatch.setattr(masked_module, "masked_weight_for_op", no_materialised_weight)
    torch.manual_seed(1)
    out, weights = sparse(*args, **fw)
    monkeypatch.undo()
    torch.manual_seed(1)
    out_ref, weights_ref = dense(*dense_args, **fw)

    assert len(calls) == IN_PROJ_CALLS[kind], calls
    assert sum(c[0] for c in calls) == 3 * E
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-12)
    if weights_ref is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, weights_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(out)
    dw = None if weights is None else torch.randn_like(weights)
    for o, w in ((out, weights), (out_ref, weights_ref)):
        ((o * dy).sum() + (0 if w is None else (w * dw).sum())).backward()
    for a, b in zip(leaves, dense_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    dense_params = dict(dense.named_parameters())
    masks = {id(unit.weight): unit.mask for _, unit in sparse_modules(sparse)}
    for name, p in sparse.named_parameters():  # masked weights: where kept (the dense grad is not 0 where pruned)
        keep = masks.get(id(p), torch.ones_like(p, dtype=torch.bool))
        torch.testing.assert_close(p.grad[keep], dense_params[name].grad[keep], rtol=1e-10, atol=1e-12, msg=name)
    for name, unit in sparse_modules(sparse):
        assert (unit.weight[~unit.mask] == 0).all(), f"{name}: pruned weights must stay zero"
        assert (unit.weight.grad[~unit.mask] == 0).all(), f"{name}: the gradient must be exactly 0 where pruned"


def test_attention_use_weights_is_dense():
    """``use_weights`` (dense-gradient scores) computes with the given in-projection, mask not applied."""
    sparse, _ = _pair({})
    dense_w = torch.randn_like(sparse.in_proj_weight, requires_grad=True)
    x = torch.randn(L, B, E, dtype=torch.float64)
    with sparse.masked_weights["in_proj_weight"].use_weight(dense_w):
        out = sparse(x, x, x, need_weights=False)[0]
    reference = densify(copy.deepcopy(sparse))
    with torch.no_grad():
        reference.in_proj_weight.copy_(dense_w)
    torch.testing.assert_close(out, reference(x, x, x, need_weights=False)[0], rtol=1e-10, atol=1e-12)
    out.sum().backward()
    assert (dense_w.grad != 0).float().mean() > 0.9  # dense gradient, pruned positions included


def test_attention_bad_input_errors():
    sparse, _ = _pair({})
    x = torch.randn(L, B, E, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        sparse(x, x, x, is_causal=True)
    with pytest.raises(RuntimeError, match="attn_mask: expected shape"):
        sparse(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises((ValueError, AssertionError), match="key_padding_mask"):
        sparse(x, x, x, key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))


def _encoder_layer():
    torch.manual_seed(0)
    layer = sparsify(nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True))
    for _, unit in sparse_modules(layer):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.4)
    return layer


def test_compile_fullgraph_sparse_transformer_encoder_layer():
    torch._dynamo.reset()
    layer = _encoder_layer()
    x = torch.randn(3, 6, 16)
    padding = torch.zeros(3, 6, dtype=torch.bool)
    padding[1, 4:] = True
    causal = torch.triu(torch.ones(6, 6, dtype=torch.bool), 1)  # bool like the padding mask (no warning)
    compiled = torch.compile(layer, fullgraph=True)
    for kwargs in ({}, {"src_key_padding_mask": padding, "src_mask": causal}):
        out = compiled(x, **kwargs)
        torch.testing.assert_close(out, layer(x, **kwargs), rtol=1e-5, atol=1e-5)
        layer.zero_grad()
        out.square().sum().backward()
        for name, unit in sparse_modules(layer):
            assert (unit.weight.grad[~unit.mask] == 0).all(), name


def test_autocast_cpu_bf16_encoder_layer_like_dense():
    """Self-attention (one fused call) under CPU bf16 autocast: output dtype and error as the dense layer's."""
    sparse = _encoder_layer()
    dense = densify(copy.deepcopy(sparse))
    dense64 = copy.deepcopy(dense).double()
    x = torch.randn(3, 6, 16)
    with torch.autocast("cpu", torch.bfloat16):
        y, y_ref = sparse(x), dense(x)
    y64 = dense64(x.double())
    assert y.dtype == y_ref.dtype
    ours, torchs = (y.double() - y64).abs().max(), (y_ref.double() - y64).abs().max()
    assert ours <= 2 * torchs + 1e-6 * y64.abs().max(), (ours, torchs)
    (y.float().square().sum()).backward()
    for name, unit in sparse_modules(sparse):
        assert unit.weight.grad.dtype == torch.float32 and (unit.weight.grad[~unit.mask] == 0).all(), name


@pytest.mark.parametrize("lead", [(), (4,), (2, 3)], ids=["unbatched", "B4", "B2x3"])
def test_bilinear_fused_matches_dense(lead, monkeypatch):
    torch.manual_seed(0)
    sparse = sparsify(nn.Bilinear(5, 7, 3).double())  # in1 * in2 = 35: one full and one partial mask word
    sparse.set_mask(torch.rand(sparse.weight.shape) < 0.5)
    dense = densify(copy.deepcopy(sparse))
    monkeypatch.setattr(masked_module, "masked_weight_for_op", lambda *a: pytest.fail("Bilinear must use the fused op"))
    x1, x2 = torch.randn(*lead, 5, dtype=torch.float64), torch.randn(*lead, 7, dtype=torch.float64)
    xs, xs_ref = [x.clone().requires_grad_() for x in (x1, x2)], [x.clone().requires_grad_() for x in (x1, x2)]
    y, y_ref = sparse(*xs), dense(*xs_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for a, b in zip(xs + [sparse.weight, sparse.bias], xs_ref + [dense.weight, dense.bias]):
        torch.testing.assert_close(a.grad, b.grad * (sparse.mask if a is sparse.weight else 1), rtol=1e-10,
                                   atol=1e-12)
    assert (sparse.weight.grad[~sparse.mask] == 0).all()


def test_bilinear_errors_and_autocast_dtype():
    sparse = sparsify(nn.Bilinear(5, 7, 3))
    with pytest.raises(ValueError, match=r"x2: expected last dimension 7 \(in2_features\)"):
        sparse(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match="x1, x2: expected the same leading dimensions"):
        sparse(torch.randn(4, 5), torch.randn(3, 7))
    x1, x2 = torch.randn(4, 5), torch.randn(4, 7)
    with torch.autocast("cpu", torch.bfloat16):  # F.bilinear is not lowered by autocast: neither is this
        assert sparse(x1, x2).dtype == densify(copy.deepcopy(sparse))(x1, x2).dtype == torch.float32
