"""Every sparse layer type against its float64 dense reference: forward, backward, exact-zero pruned
gradients, strict dense reload, optimizer masking, autocast, compile (issue 10 items 1 and 3)."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparse_engine import MaskedModule, densify, mask_optimizer, sparse_modules, sparsify, sparsity_report
from sparse_engine.ops.masked_weight import (masked_embedding, masked_embedding_ref, masked_weight,
                                             masked_weight_ref)
from sparse_engine.ops.mask_pack import pack_mask, unpack_mask


class ScaledLinear(nn.Linear):
    """A user subclass that keeps nn.Linear's forward: converted, its methods kept."""

    def scale(self) -> float:
        return 2.0


class GatedLinear(nn.Linear):
    """A user subclass that overrides forward: left dense (its forward may use the weight anywhere)."""

    def forward(self, x):
        return super().forward(x) * torch.sigmoid(x @ self.weight.T)


def _self_attention(batch_first=True):
    q = torch.randn(2, 5, 12) if batch_first else torch.randn(5, 2, 12)
    return (q, q, q)


# id -> (dense layer builder, inputs builder). Odd sizes, every option that changes the weight's use.
SPECS = {
    "linear": (lambda: nn.Linear(13, 7), lambda: (torch.randn(5, 13),)),
    "linear-subclass": (lambda: ScaledLinear(9, 4), lambda: (torch.randn(3, 9),)),
    "conv1d-groups": (lambda: nn.Conv1d(4, 6, 5, stride=2, padding=2, groups=2), lambda: (torch.randn(2, 4, 17),)),
    "conv1d-same-reflect": (lambda: nn.Conv1d(3, 5, 4, padding="same", padding_mode="reflect", dilation=2),
                            lambda: (torch.randn(2, 3, 11),)),
    "conv2d": (lambda: nn.Conv2d(3, 5, 3, padding=1), lambda: (torch.randn(2, 3, 7, 6),)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1)), lambda: (torch.randn(2, 2, 5, 6, 7),)),
    "convT1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), lambda: (torch.randn(2, 4, 9),)),
    "convT2d-groups": (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1, groups=2),
                       lambda: (torch.randn(2, 4, 5, 6),)),
    "convT3d": (lambda: nn.ConvTranspose3d(2, 4, 2, stride=2), lambda: (torch.randn(1, 2, 3, 4, 5),)),
    "embedding-padding": (lambda: nn.Embedding(37, 11, padding_idx=3), lambda: (torch.randint(0, 37, (4, 9)),)),
    "embedding-freq": (lambda: nn.Embedding(23, 7, scale_grad_by_freq=True), lambda: (torch.randint(0, 23, (31,)),)),
    "bilinear": (lambda: nn.Bilinear(5, 7, 3), lambda: (torch.randn(4, 5), torch.randn(4, 7))),
    "lstm-2layer-bidir-proj": (lambda: nn.LSTM(6, 8, num_layers=2, bidirectional=True, proj_size=3),
                               lambda: (torch.randn(5, 4, 6),)),
    "gru-batch-first": (lambda: nn.GRU(6, 8, batch_first=True), lambda: (torch.randn(4, 5, 6),)),
    "rnn-relu": (lambda: nn.RNN(6, 8, nonlinearity="relu"), lambda: (torch.randn(5, 4, 6),)),
    "mha-batch-first": (lambda: nn.MultiheadAttention(12, 3, batch_first=True), _self_attention),
    "mha-kdim-vdim": (lambda: nn.MultiheadAttention(12, 3, kdim=5, vdim=7, bias=False),
                      lambda: (torch.randn(4, 2, 12), torch.randn(6, 2, 5), torch.randn(6, 2, 7))),
}
IDS = list(SPECS)


def _first(y):
    return y[0] if isinstance(y, tuple) else y


def _prepare(spec_id, dtype=torch.float64, density=0.5):
    """(sparse layer with random masks, its dense reference on W*M, inputs), all in ``dtype``."""
    make, inputs = SPECS[spec_id]
    sparse = sparsify(make().to(dtype))
    assert isinstance(sparse, MaskedModule), f"{spec_id} was not converted"
    for _, unit in sparse_modules(sparse):
        unit.set_mask(torch.rand(unit.weight.shape) < density)
    reference = densify(copy.deepcopy(sparse))
    xs = [x.to(dtype) if x.is_floating_point() else x for x in inputs()]
    return sparse, reference, xs


def _leaves(xs):
    return [x.detach().clone().requires_grad_() if x.is_floating_point() else x for x in xs]


def _param_names(module):
    return {id(p): n for n, p in module.named_parameters()}


@pytest.mark.parametrize("spec_id", IDS)
def test_forward_backward_match_float64_reference(spec_id):
    sparse, reference, xs = _prepare(spec_id)
    xs_s, xs_r = _leaves(xs), _leaves(xs)
    y, y_ref = _first(sparse(*xs_s)), _first(reference(*xs_r))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    dy = torch.randn_like(y)
    (y * dy).sum().backward()
    (y_ref * dy).sum().backward()
    for a, b in zip(xs_s, xs_r):
        if a.is_floating_point():
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)
    ref_params = dict(reference.named_parameters())
    names = _param_names(sparse)
    for unit_name, unit in sparse_modules(sparse):
        mask = unit.mask
        assert (unit.weight[~mask] == 0).all(), f"{unit_name}: set_mask must zero pruned weights"
        grad, ref_grad = unit.weight.grad, ref_params[names[id(unit.weight)]].grad
        assert (grad[~mask] == 0).all(), f"{unit_name}: the weight gradient must be exactly 0 where pruned"
        torch.testing.assert_close(grad[mask], ref_grad[mask], rtol=1e-10, atol=1e-12)
    for name, p in sparse.named_parameters():  # biases and unmasked parameters
        if all(p is not u.weight for _, u in sparse_modules(sparse)):
            torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spec_id", IDS)
def test_strict_dense_reload_and_masks_back(spec_id):
    sparse, _, xs = _prepare(spec_id, torch.float32)
    state = sparse.state_dict()
    dense = SPECS[spec_id][0]()
    assert set(state) == set(dense.state_dict())
    dense.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(_first(dense(*xs)), _first(sparse(*xs)), rtol=1e-5, atol=1e-6)
    fresh = sparsify(SPECS[spec_id][0]())
    fresh.load_state_dict(state, strict=True)
    for (_, a), (_, b) in zip(sparse_modules(sparse), sparse_modules(fresh)):
        assert torch.equal(a.mask, b.mask) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("spec_id", IDS)
def test_optimizer_masking(spec_id):
    """AdamW moments built before a mask change must not revive pruned weights."""
    sparse, _, xs = _prepare(spec_id, torch.float32, density=1.0)
    opt = torch.optim.AdamW(sparse.parameters(), lr=1e-2, weight_decay=0.1)
    mask_optimizer(opt, sparse)
    for step in range(3):
        if step == 1:
            for _, unit in sparse_modules(sparse):
                unit.set_mask(torch.rand(unit.weight.shape) < 0.4)
        opt.zero_grad()
        _first(sparse(*xs)).square().mean().backward()
        opt.step()
        for name, unit in sparse_modules(sparse):
            assert (unit.weight[~unit.mask] == 0).all(), f"{name}: pruned weight revived at step {step}"
            for key, value in opt.state[unit.weight].items():
                if isinstance(value, torch.Tensor) and value.shape == unit.weight.shape:
                    assert (value[~unit.mask] == 0).all(), f"{name}: optimizer state '{key}' at pruned entries"


def _autocast_errors(spec_id, device, dtype):
    """Errors against float64 of the sparse layer and of its dense W*M reference, both under autocast."""
    sparse64, reference64, xs = _prepare(spec_id)
    sparse, reference = copy.deepcopy(sparse64).float().to(device), copy.deepcopy(reference64).float().to(device)
    xs32 = [(x.float() if x.is_floating_point() else x).to(device) for x in xs]
    xs_s, xs_r, xs_64 = _leaves(xs32), _leaves(xs32), _leaves(xs)
    with torch.autocast(device, dtype):
        y, y_ref = _first(sparse(*xs_s)), _first(reference(*xs_r))
    y_64 = _first(reference64(*xs_64))
    assert y.dtype == y_ref.dtype, "the sparse layer must follow its dense layer's autocast policy"
    dy = torch.randn_like(y_64)
    (y.double() * dy.to(device)).sum().backward()
    (y_ref.double() * dy.to(device)).sum().backward()
    (y_64 * dy).sum().backward()
    pairs = [(y, y_ref, y_64)]
    names, ref_params, ref64 = _param_names(sparse), dict(reference.named_parameters()), dict(reference64.named_parameters())
    for _, unit in sparse_modules(sparse):
        name, mask = names[id(unit.weight)], unit.mask
        assert unit.weight.grad.dtype == unit.weight.dtype and (unit.weight.grad[~mask] == 0).all()
        pairs.append((unit.weight.grad[mask], ref_params[name].grad[mask], ref64[name].grad[mask.cpu()]))
    return [((a.double().cpu() - c).abs().max().item(), (b.double().cpu() - c).abs().max().item(), c.abs().max().item())
            for a, b, c in pairs]


@pytest.mark.parametrize("spec_id", IDS)
def test_autocast_cpu_bf16(spec_id):
    for ours, torchs, scale in _autocast_errors(spec_id, "cpu", torch.bfloat16):
        assert ours <= 2 * torchs + 1e-6 * scale, f"error {ours:.3g} vs torch's {torchs:.3g} (scale {scale:.3g})"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("spec_id", IDS)
def test_autocast_cuda(spec_id, dtype):
    for ours, torchs, scale in _autocast_errors(spec_id, "cuda", dtype):
        assert ours <= 2 * torchs + 1e-6 * scale, f"error {ours:.3g} vs torch's {torchs:.3g} (scale {scale:.3g})"


class Zoo(nn.Module):
    """One model with every non-recurrent layer type (torch.compile graph-breaks on RNNs)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12, padding_idx=0)
        self.attn = nn.MultiheadAttention(12, 3, batch_first=True)
        self.conv1d = nn.Conv1d(12, 8, 3, padding=1)
        self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)
        self.conv3d = nn.Conv3d(1, 2, 3, padding=1)
        self.bilinear = nn.Bilinear(4, 4, 6)
        self.head = ScaledLinear(6, 3)

    def forward(self, tokens):
        x = self.embed(tokens)                                   # (B, T, 12)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = self.up(torch.relu(self.conv1d(x.transpose(1, 2))))  # (B, 4, 2T)
        v = self.conv3d(x.unsqueeze(1).unsqueeze(1)).mean((1, 2))  # (B, 4, 2T)
        z = self.bilinear(v.mean(-1), x.mean(-1))
        return self.head(torch.tanh(z))


def test_compile_fullgraph_every_nonrecurrent_type():
    torch._dynamo.reset()
    model = sparsify(Zoo())
    assert all(isinstance(m, MaskedModule) for m in model.children())
    for _, unit in sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.5)
    tokens = torch.randint(0, 50, (2, 7))
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(tokens)
    torch.testing.assert_close(out, model(tokens), rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    for name, unit in sparse_modules(model):
        assert (unit.weight.grad[~unit.mask] == 0).all(), name


def test_gradscaler_training_keeps_masks():
    model = sparsify(nn.Sequential(nn.Conv1d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 9, 4)))
    for _, unit in sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mask_optimizer(opt, model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = torch.randn(16, 3, 11), torch.randint(0, 4, (16,))
    for _ in range(3):
        with torch.autocast("cpu", torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    for name, unit in sparse_modules(model):
        assert (unit.weight[~unit.mask] == 0).all(), name


def test_linear_subclasses():
    model = sparsify(nn.Sequential(ScaledLinear(4, 3), GatedLinear(3, 3)))
    assert isinstance(model[0], MaskedModule) and isinstance(model[0], ScaledLinear) and model[0].scale() == 2.0
    assert type(model[1]) is GatedLinear
    report = sparsity_report(model)
    assert [w.name for w in report.dense] == ["1.weight"]
    assert "overrides forward()" in report.dense[0].reason
    with pytest.raises(TypeError, match="layer '0' of type GatedLinear .* overrides forward"):
        sparsify(nn.Sequential(GatedLinear(3, 3)), include="0")
    # Generated classes pickle by their dense class (a fresh process rebuilds them).
    clone = pickle.loads(pickle.dumps(model))
    assert type(clone[0]) is type(model[0]) and torch.equal(clone[0].mask, model[0].mask)
    densify(model)
    assert type(model[0]) is ScaledLinear


def test_transformer_inference_fast_path_uses_masks():
    """torch's fused TransformerEncoderLayer inference reads raw weights: it must not run on sparse layers."""
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    encoder = sparsify(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)).eval()
    for _, unit in sparse_modules(encoder):
        unit.set_mask(torch.rand(unit.weight.shape) < 0.5)
    x = torch.randn(2, 5, 16)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    with torch.no_grad():
        expected = encoder(x, src_key_padding_mask=padding)
        for _, unit in sparse_modules(encoder):  # weights drift at pruned positions (a forgotten mask_optimizer)
            unit.weight.add_(~unit.mask * 0.5)
        torch.testing.assert_close(encoder(x, src_key_padding_mask=padding), expected)
    densify(encoder)
    assert not encoder.layers[0]._forward_pre_hooks and encoder.use_nested_tensor


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 5), (2, 3, 3, 3)], ids=str)
def test_masked_weight_against_reference(shape):
    w = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bits = pack_mask(torch.rand(shape) < 0.5)
    torch.testing.assert_close(masked_weight(w, bits), masked_weight_ref(w, bits), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: masked_weight(t, bits), (w,))
    with pytest.raises(ValueError, match=r"mask_bits: expected shape"):
        masked_weight(w, pack_mask(torch.ones(shape[0] + 1, *shape[1:], dtype=torch.bool)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
def test_masked_weight_op_layouts_and_sizes(dtype, layout):
    """The C++ op (AVX2 clones, chunks of words in parallel) on more words than one parallel chunk,
    a ragged last word per row, every element size, and strided weights; gradients are masked
    copies too, differentiable again (gradgradcheck)."""
    rows, cols = 301, 453  # 301 * 15 words: several chunks of 1024 words
    base = torch.randn(cols, rows) if layout == "transposed" else torch.randn(rows, 2 * cols)
    w = {"contiguous": base[:, :cols].contiguous(), "transposed": base.t(), "sliced": base[:, ::2]}[layout]
    w = w.to(dtype).requires_grad_()
    mask = torch.rand(rows, cols) < 0.5
    bits = pack_mask(mask)
    out = masked_weight(w, bits)
    assert out.is_contiguous() and out.dtype == dtype
    assert torch.equal(out, torch.where(mask, w.detach(), torch.zeros((), dtype=dtype)))
    assert (out[~mask].view(torch.int16 if dtype.itemsize == 2 else torch.int32 if dtype.itemsize == 4
                            else torch.int64) == 0).all()  # +0 exactly
    g = torch.randn(rows, cols, dtype=dtype)
    out.backward(g)
    assert torch.equal(w.grad, torch.where(mask, g, torch.zeros((), dtype=dtype)))
    if dtype == torch.float64:
        small = torch.randn(5, 37, dtype=dtype, requires_grad=True)
        small_bits = pack_mask(torch.rand(5, 37) < 0.5)
        assert torch.autograd.gradgradcheck(lambda t: masked_weight(t, small_bits), (small,))


def test_masked_embedding_against_reference():
    w = torch.randn(29, 37, dtype=torch.float64, requires_grad=True)
    bits = pack_mask(torch.rand(29, 37) < 0.5)
    idx = torch.randint(0, 29, (3, 5))
    mask = unpack_mask(bits, (29, 37))
    assert torch.autograd.gradcheck(lambda t: masked_embedding(idx, t, bits), (w,))
    # padding_idx and scale_grad_by_freq change the gradient on purpose (no gradcheck): compare with F.embedding's.
    kwargs = {"padding_idx": 2, "scale_grad_by_freq": True}
    ours, ref = w.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    dy = torch.randn(3, 5, 37, dtype=torch.float64)
    (masked_embedding(idx, ours, bits, **kwargs) * dy).sum().backward()
    (masked_embedding_ref(idx, ref, bits, **kwargs) * dy).sum().backward()
    torch.testing.assert_close(masked_embedding(idx, w, bits, **kwargs), masked_embedding_ref(idx, w, bits, **kwargs),
                               rtol=0, atol=0)
    torch.testing.assert_close(ours.grad, ref.grad * mask, rtol=0, atol=0)
    w.grad = None
    masked_embedding(idx, w, bits, sparse=True).sum().backward()
    assert w.grad.is_sparse
    counts = torch.bincount(idx.flatten(), minlength=29).double()
    torch.testing.assert_close(w.grad.to_dense(), counts[:, None] * mask, rtol=0, atol=0)
