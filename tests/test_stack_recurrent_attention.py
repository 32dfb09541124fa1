"""Stacked LSTM/GRU/RNN and MultiheadAttention: every option against the K sparse layers run one by one
(float64: outputs, states, attention weights, every gradient), exact-zero gradients at pruned entries,
round trips, errors, compile."""
import pytest
import torch
from torch import nn

import sparse_engine as se
from sparse_engine.ops import dispatch
from sparse_engine.stack import StackedGRU, StackedLSTM, StackedMultiheadAttention, StackedRNN, stack, unstack
from test_stack import SeqNet, assert_models_equal, make_models, random_masks_

K = 3
F64 = torch.float64


class Wrap(nn.Module):
    """One layer as a model (its forward takes several arguments, which ``nn.Sequential`` does not pass)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return self.layer(*args, **kwargs)


def sparse_layers(build, seed=0):
    layers = []
    for i in range(K):
        torch.manual_seed(seed + i)
        layer = se.sparsify(Wrap(build().double()))
        with torch.no_grad():  # non-zero biases everywhere (bias_k/bias_v start at zeros in torch)
            for n, p in layer.named_parameters():
                if "bias" in n:
                    p.normal_()
        layers.append(random_masks_(layer))
    return layers


def flat(out):
    """The tensors of a layer's output, in order: ``output, h`` or ``output, (h, c)`` or ``output, weights``."""
    items = []
    for t in out if isinstance(out, tuple) else (out,):
        items.extend(t if isinstance(t, tuple) else (t,))
    return [t for t in items if t is not None]


def check_like_separate(layers, args, kwargs=None, per_model=()):
    """The stacked layers on ``args`` (model axis first) == each layer on its slice; the same for the gradients
    of a random function of all outputs. ``per_model``: names of kwargs with a model axis."""
    kwargs = kwargs or {}
    for layer in layers:
        layer.zero_grad()
    stacked = stack(layers)
    out = flat(stacked(*args, **kwargs))
    grads_out = [torch.randn_like(t) for t in out]
    torch.autograd.backward(out, grads_out)
    for i, layer in enumerate(layers):
        kw = {k: (v[i] if k in per_model else v) for k, v in kwargs.items()}
        mine = flat(layer(*[a[i] if isinstance(a, torch.Tensor) else tuple(t[i] for t in a) for a in args], **kw))
        assert len(mine) == len(out)
        for a, b in zip(out, mine):
            torch.testing.assert_close(a[i], b, rtol=1e-10, atol=1e-12)
        torch.autograd.backward(mine, [g[i] for g in grads_out])
    for n, p in stacked.named_parameters():
        for i, layer in enumerate(layers):
            torch.testing.assert_close(p.grad[i], layer.get_parameter(n.removeprefix("module.")).grad, rtol=1e-10,
                                       atol=1e-12, msg=n)
    for name, unit in stacked.masked_units():  # pruned entries: exact zeros
        assert unit.mask.any() and not unit.mask.all(), name
        assert (unit.weight.grad[~unit.mask] == 0).all(), name
    return stacked


RNNS = {
    "lstm-2layer-bidirectional-batch_first": lambda: nn.LSTM(5, 4, num_layers=2, bidirectional=True, batch_first=True),
    "lstm-proj": lambda: nn.LSTM(5, 4, proj_size=3),
    "lstm-no-bias-dropout": lambda: nn.LSTM(5, 4, num_layers=2, bias=False, dropout=0.3),
    "gru-2layer-bidirectional": lambda: nn.GRU(5, 4, num_layers=2, bidirectional=True),
    "gru-batch_first": lambda: nn.GRU(5, 4, batch_first=True),
    "rnn-tanh": lambda: nn.RNN(5, 4, num_layers=2),
    "rnn-relu-no-bias-bidirectional": lambda: nn.RNN(5, 4, nonlinearity="relu", bias=False, bidirectional=True),
}


@pytest.fixture(params=["fused", "materialized"], ids=["batched-recurrence", "per-model-fused-kernel"])
def rnn_impl(request):
    """Both implementations of the stacked recurrent layers (``dispatch`` picks one by measurement)."""
    previous = dispatch.pinned()
    dispatch.pin(request.param)
    yield request.param
    dispatch.pin(previous)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("with_hx", [False, True], ids=["zero-state", "hx"])
@pytest.mark.parametrize("name", list(RNNS))
def test_recurrent_layers_like_separate_models(name, with_hx, batched, rnn_impl):
    layers = sparse_layers(RNNS[name])
    rnn = layers[0].layer
    if "dropout" in name:  # dropout draws differ between a stack and separate runs: compare in eval mode
        layers = [m.eval() for m in layers]
    t, b = 6, 3
    shape = ((K, b, t, 5) if rnn.batch_first else (K, t, b, 5)) if batched else (K, t, 5)
    x = torch.randn(*shape, dtype=F64, requires_grad=True)
    args = [x]
    if with_hx:
        n = rnn.num_layers * (2 if rnn.bidirectional else 1)
        lead = (K, n, b) if batched else (K, n)
        h0 = torch.randn(*lead, rnn.proj_size or rnn.hidden_size, dtype=F64)
        args.append((h0, torch.randn(*lead, rnn.hidden_size, dtype=F64)) if isinstance(rnn, nn.LSTM) else h0)
    stacked = check_like_separate(layers, args)
    kind = {nn.LSTM: StackedLSTM, nn.GRU: StackedGRU, nn.RNN: StackedRNN}[rnn.dense_type]
    assert type(stacked.module.layer) is kind
    assert len(stacked.masked_units()) == len(se.sparse_modules(layers[0]))
    for m, u in zip(layers, unstack(stacked)):
        assert_models_equal(m, u)


def test_recurrent_implementation_is_measured_without_drawing_random_numbers():
    """The first call of a new shape times both implementations (dropout included) on copies; the RNG streams
    and the result are those of a call that measures nothing."""
    layers = [nn.Sequential(nn.LSTM(4, 8, num_layers=2, dropout=0.5)) for _ in range(K)]
    stacked = stack(layers)
    x = torch.randn(5, 2, 4)
    previous = dispatch.pinned()
    dispatch.pin(None)
    try:
        dispatch.clear()
        torch.manual_seed(3)
        first, _ = stacked(x, broadcast=True)
        after_first = torch.get_rng_state()
        assert any(key.startswith("stacked_rnn|") for key in dispatch.choices())
        torch.manual_seed(3)
        second, _ = stacked(x, broadcast=True)  # the cached choice: nothing measured
        assert torch.equal(first, second) and torch.equal(after_first, torch.get_rng_state())
    finally:
        dispatch.pin(previous)


def test_recurrent_implementation_is_chosen_once_per_model_shape():
    """Stacks of any size take the choice made for the first: a sweep resumes trials in stacks of other sizes,
    and the implementations differ in the last bits."""
    previous = dispatch.pinned()
    dispatch.pin(None)
    try:
        dispatch.clear()
        x = torch.randn(6, 3, 4)
        stack([nn.Sequential(nn.GRU(4, 5)) for _ in range(2)])(x, broadcast=True)
        keys = [k for k in dispatch.choices() if k.startswith("stacked_rnn|")]
        assert len(keys) == 1 and "(6, 3, 4)" in keys[0]  # one model's input shape, not (2, 6, 3, 4)
        stack([nn.Sequential(nn.GRU(4, 5)) for _ in range(5)])(x, broadcast=True)
        assert [k for k in dispatch.choices() if k.startswith("stacked_rnn|")] == keys
    finally:
        dispatch.pin(previous)


def test_recurrent_dropout_is_independent_per_model(rnn_impl):
    layers = [nn.Sequential(nn.LSTM(4, 32, num_layers=2, dropout=0.5)) for _ in range(K)]
    for m in layers[1:]:
        m.load_state_dict(layers[0].state_dict())
    out, _ = stack(layers)(torch.randn(5, 2, 4), broadcast=True)
    assert not torch.equal(out[0], out[1]) and not torch.equal(out[1], out[2])
    out, _ = stack(layers).eval()(torch.randn(5, 2, 4), broadcast=True)
    torch.testing.assert_close(out[0], out[1])


def mha(**options):
    return lambda: nn.MultiheadAttention(8, 2, **options)


ATTENTION = {
    "self-batch_first": (mha(batch_first=True), "self"),
    "self-bias_kv-zero_attn": (mha(add_bias_kv=True, add_zero_attn=True), "self"),
    "key-is-value": (mha(), "kv"),
    "distinct-no-bias": (mha(bias=False), "distinct"),
    "kdim-vdim": (mha(kdim=3, vdim=5, batch_first=True), "distinct"),
}


@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)],
                         ids=["sdpa", "weights", "per-head-weights"])
@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_like_separate_models(name, batched, need_weights, average):
    build, inputs = ATTENTION[name]
    layers = sparse_layers(build)
    attn = layers[0].layer
    lq, ls, b = 5, 4, 2

    def draw(length, dim):
        shape = ((K, b, length, dim) if attn.batch_first else (K, length, b, dim)) if batched else (K, length, dim)
        return torch.randn(*shape, dtype=F64, requires_grad=True)

    q = draw(lq, 8)
    if inputs == "self":
        args = [q, q, q]
    elif inputs == "kv":
        k = draw(ls, 8)
        args = [q, k, k]
    else:
        args = [q, draw(ls, attn.kdim), draw(ls, attn.vdim)]
    stacked = check_like_separate(layers, args, {"need_weights": need_weights, "average_attn_weights": average})
    assert type(stacked.module.layer) is StackedMultiheadAttention
    assert [n for n, _ in stacked.masked_units()] == [n for n, _ in se.sparse_modules(layers[0])]
    for m, u in zip(layers, unstack(stacked)):
        assert_models_equal(m, u)


@pytest.mark.parametrize("need_weights", [False, True], ids=["sdpa", "weights"])
@pytest.mark.parametrize("masks", ["padding-shared", "padding-per-model", "attn-2d", "attn-3d-shared",
                                   "attn-4d-per-model", "both-float", "causal"])
def test_attention_masks(masks, need_weights):
    layers = sparse_layers(mha(batch_first=True))
    lq, b, heads = 5, 2, 2
    q = torch.randn(K, b, lq, 8, dtype=F64, requires_grad=True)
    padding = torch.rand(K, b, lq) < 0.3
    padding[..., 0] = False  # every query attends to at least one key
    attn = torch.rand(K, b * heads, lq, lq) < 0.3
    attn[..., 0] = False
    kwargs, per_model = {"need_weights": need_weights}, ()
    if masks == "padding-shared":
        kwargs["key_padding_mask"] = padding[0]
    elif masks == "padding-per-model":
        kwargs["key_padding_mask"], per_model = padding, ("key_padding_mask",)
    elif masks == "attn-2d":
        kwargs["attn_mask"] = attn[0, 0]
    elif masks == "attn-3d-shared":
        kwargs["attn_mask"] = attn[0]
    elif masks == "attn-4d-per-model":
        kwargs["attn_mask"], per_model = attn, ("attn_mask",)
    elif masks == "both-float":
        kwargs["attn_mask"] = torch.randn(lq, lq, dtype=F64)
        kwargs["key_padding_mask"], per_model = torch.randn(K, b, lq, dtype=F64), ("key_padding_mask",)
    else:
        kwargs["attn_mask"], kwargs["is_causal"] = nn.Transformer.generate_square_subsequent_mask(lq, dtype=F64), True
    check_like_separate(layers, [q, q, q], kwargs, per_model)


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 2,
                                             enable_nested_tensor=False)
        self.pre_norm = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=True)

    def forward(self, x, src_key_padding_mask=None):
        return self.pre_norm(self.encoder(x, src_key_padding_mask=src_key_padding_mask),
                             src_key_padding_mask=src_key_padding_mask)


@pytest.mark.parametrize("padding", [False, True], ids=["no-mask", "key-padding"])
def test_transformer_encoder_like_separate_models(padding):
    """nn.TransformerEncoder and pre-norm/post-norm nn.TransformerEncoderLayer run their own forwards on
    (K, B, T, E)."""
    layers = sparse_layers(Encoder)
    x = torch.randn(K, 2, 5, 8, dtype=F64, requires_grad=True)
    kwargs = {}
    if padding:
        kwargs["src_key_padding_mask"] = torch.rand(2, 5) < 0.3
        kwargs["src_key_padding_mask"][:, 0] = False
    check_like_separate(layers, [x], kwargs)


def test_compile_fullgraph_of_recurrent_and_attention_layers():
    torch._dynamo.reset()
    eager, compiled = stack(make_models("seq")), stack(make_models("seq"))
    x = torch.randn(K, 4, 7, 4, dtype=F64)
    torch.compile(compiled, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_load_slice_recurses_into_out_proj():
    models = make_models("seq")
    stacked = stack(models)
    attn = stacked.module.attn
    attn.load_slice_(2, models[0].attn)
    assert torch.equal(attn.in_proj_weight[2], models[0].attn.in_proj_weight)
    assert torch.equal(attn.out_proj.weight[2], models[0].attn.out_proj.weight)
    assert torch.equal(attn.out_proj.mask[2], models[0].attn.out_proj.mask)
    assert torch.equal(attn.mask_of("in_proj_weight")[2], models[0].attn.mask_of("in_proj_weight"))
    back = unstack(stacked)[2]
    assert isinstance(back, SeqNet) and back.attn.out_proj.input_kind is None


def test_dense_attention_comes_back_dense_or_with_out_proj_called_by_its_parent():
    """A dense MultiheadAttention comes back (and views, for the pruners) dense; one whose out_proj mask was
    set in the stack comes back as sparsify converts it: the attention sparse, its out_proj without an input
    kind (the attention calls its forward function without hooks)."""
    from sparse_engine.stack.pruning import model_views
    stacked = stack([Wrap(nn.MultiheadAttention(4, 2)) for _ in range(2)])
    for model in unstack(stacked) + model_views(stacked):
        assert type(model.layer) is nn.MultiheadAttention and not isinstance(model.layer.out_proj, se.MaskedModule)
    mask = torch.rand(2, 4, 4) < 0.5
    stacked.module.layer.out_proj.set_mask(mask)
    for k, model in enumerate(unstack(stacked)):
        assert isinstance(model.layer, se.SparseMultiheadAttention)
        assert model.layer.out_proj.input_kind is None and torch.equal(model.layer.out_proj.mask, mask[k])
        assert model.layer.mask_of("in_proj_weight").all()
    assert se.sparsify(Wrap(nn.MultiheadAttention(4, 2))).layer.out_proj.input_kind is None


def test_errors():
    stacked = stack([nn.Sequential(nn.LSTM(4, 3, batch_first=True)) for _ in range(2)])
    lstm = stacked.module[0]
    with pytest.raises(ValueError, match=r"input: expected shape \(2, B, T, 4\) or unbatched \(2, T, 4\)"):
        lstm(torch.randn(3, 5, 6, 4))
    with pytest.raises(TypeError, match="input: a PackedSequence has no stacked version"):
        lstm(nn.utils.rnn.pack_padded_sequence(torch.randn(2, 5, 4), [5, 3], batch_first=True))
    with pytest.raises(TypeError, match=r"hx: expected a tuple \(h_0, c_0\)"):
        lstm(torch.randn(2, 5, 6, 4), torch.zeros(2, 1, 5, 3))
    with pytest.raises(ValueError, match=r"hx\[1\]: expected shape \(2, 1, 5, 3\)"):
        lstm(torch.randn(2, 5, 6, 4), (torch.zeros(2, 1, 5, 3), torch.zeros(1, 5, 3)))
    with pytest.raises(ValueError, match="name: 'weight' is not a masked weight of StackedLSTM"):
        lstm.mask
    attn = stack([nn.Sequential(nn.MultiheadAttention(4, 2)) for _ in range(2)]).module[0]
    with pytest.raises(ValueError, match=r"key: expected shape \(2, B, L, E\)"):
        attn(torch.randn(2, 3, 1, 4), torch.randn(3, 1, 4), torch.randn(3, 1, 4))
    with pytest.raises(ValueError, match=r"key_padding_mask: expected shape \(1, 3\) \(shared by the models\) or "
                                         r"\(2, 1, 3\) \(one per model\), got \(3, 2, 1, 3\)"):
        attn(*[torch.randn(2, 3, 1, 4)] * 3, key_padding_mask=torch.zeros(3, 2, 1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"attn_mask: expected shape \(3, 3\) or \(2, 3, 3\) \(shared by the "
                                         r"models\) or \(2, 2, 3, 3\) \(one per model\), got \(3, 4\)"):
        attn(*[torch.randn(2, 3, 1, 4)] * 3, attn_mask=torch.zeros(3, 4, dtype=torch.bool))


def test_zoo_lstm_classifier_stacks():
    from sparse_engine.models import example_batch, lstm
    models = []
    for i in range(K):
        torch.manual_seed(i)
        models.append(random_masks_(se.sparsify(lstm(vocab_size=50, embed_dim=6, hidden_size=5).double())))
    tokens = torch.stack([example_batch("lstm", 3, torch.Generator().manual_seed(i), vocab_size=50)[0]
                          for i in range(K)])
    check_like_separate(models, [tokens])


def test_zoo_transformer_stacks():
    """The zoo transformer (embedding, learned positions stacked with vmap, pre-norm encoder, head)."""
    from sparse_engine.models import transformer
    models = []
    for i in range(K):
        torch.manual_seed(i)
        m = transformer(vocab_size=50, d_model=8, nhead=2, num_layers=2, dim_feedforward=16, max_len=12)
        models.append(random_masks_(se.sparsify(m.double().eval())))  # eval: no dropout draws to compare
    check_like_separate(models, [torch.randint(0, 50, (K, 3, 10))])


def test_zoo_transformer_loads_checkpoints_with_the_earlier_positions_key():
    from sparse_engine.models import transformer
    state = transformer(vocab_size=20, d_model=8, nhead=2, max_len=6).state_dict()
    earlier = {("pos" if k == "pos.weight" else k): v for k, v in state.items()}
    model = transformer(vocab_size=20, d_model=8, nhead=2, max_len=6)
    model.load_state_dict(earlier)
    assert torch.equal(model.pos.weight, state["pos.weight"])


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_layers_under_autocast_cast_as_torch_does(cls):
    """Under CPU autocast the stacked layer gives each model what the torch layer alone gives (dtype and
    values), whatever implementation is pinned, and takes its own h_n back as hx."""
    layers = [Wrap(cls(4, 5, batch_first=True)) for _ in range(2)]
    x = torch.randn(2, 3, 6, 4)
    previous = dispatch.pinned()
    try:
        for impl in ("fused", "materialized", None):
            dispatch.pin(impl)
            stacked = stack(layers).module.layer
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out, h = stacked(x)
                stacked(x, h)
                for k, layer in enumerate(layers):
                    alone, _ = layer(x[k])
                    assert out.dtype == alone.dtype
                    torch.testing.assert_close(out[k], alone, rtol=0, atol=0)
    finally:
        dispatch.pin(previous)


@pytest.mark.parametrize("batched", [True, False], ids=["batched", "unbatched"])
def test_dense_encoder_layers_in_eval_and_no_grad_take_the_stacked_path(batched):
    """torch's fused inference path of nn.TransformerEncoderLayer would read the stacked weights as one model's:
    stack() keeps it off, as sparsify does (a stacked unbatched (K, T, E) input looks batched to torch)."""
    layers = [Wrap(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2)).eval()
              for _ in range(K)]
    x = torch.randn(K, 2, 5, 8) if batched else torch.randn(K, 5, 8)
    stacked = stack(layers)
    with torch.no_grad():
        y = stacked(x)
        for k, layer in enumerate(layers):
            torch.testing.assert_close(y[k], layer(x[k]), rtol=1e-5, atol=1e-5)
    for model in unstack(stacked):  # the unstacked dense models are guarded no more than the originals
        assert not model.layer.layers[0]._forward_pre_hooks and model.layer.use_nested_tensor == \
            layers[0].layer.use_nested_tensor


def check_float32_stack_against_float64(device: str, impl: str) -> None:
    """The LSTM/GRU/attention models stacked in float32 on ``device``: their outputs and gradients are as close to
    the float64 models (on the CPU) as the float32 models run one by one on ``device`` are (within 4x)."""
    import copy
    models = make_models("seq")  # float64, CPU
    x = torch.randn(K, 4, 7, 4, dtype=F64)
    dy = torch.randn(K, 4, 5, dtype=F64)
    for i, m in enumerate(models):
        m(x[i]).backward(dy[i])
    singles = [copy.deepcopy(m).float().to(device) for m in models]
    for m in singles:
        m.zero_grad()
    previous = dispatch.pinned()
    dispatch.pin(impl)
    try:
        stacked = stack(singles)
        y = stacked(x.float().to(device))
        y.backward(dy.float().to(device))
        ys = [m(x[i].float().to(device)) for i, m in enumerate(singles)]
        for i, m in enumerate(singles):
            ys[i].backward(dy[i].float().to(device))
    finally:
        dispatch.pin(previous)

    def err(a, b):
        return (a.double().cpu() - b).abs().max().item()

    for i, m in enumerate(models):
        ref = m(x[i]).detach()
        assert err(y[i], ref) <= 4 * err(ys[i], ref) + 1e-6, f"model {i}: output"
        for n, p in m.named_parameters():
            got = stacked.get_parameter("module." + n).grad[i]
            assert err(got, p.grad) <= 4 * err(singles[i].get_parameter(n).grad, p.grad) + 1e-6, f"model {i}: {n}"


@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_float32_stack_against_float64_on_cpu(impl):
    check_float32_stack_against_float64("cpu", impl)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "materialized"])
def test_float32_stack_against_float64_on_cuda(impl):
    """On a GPU: stacked Triton projections, the recurrence's bmm or cuDNN per model, SDPA on the folded batch."""
    check_float32_stack_against_float64("cuda", impl)
