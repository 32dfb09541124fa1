"""stack/unstack: bit-identical round trips, stacked forward/backward == the K models run one by one
(float64), BatchNorm running statistics per model, residual blocks, dropout, compile, errors."""
import pytest
import torch
from torch import nn

import sparse_engine as se
from sparse_engine.models import BasicBlock, fashion_cnn, fashion_mlp
from sparse_engine.stack import StackedModel, stack, unstack

K = 3


def random_masks_(model, generator=None):
    """Random per-layer sparsity, never all-dense: each model gets its own masks."""
    for _, unit in se.sparse_modules(model):
        unit.set_mask(torch.rand(unit.weight.shape, generator=generator) >= torch.rand(1, generator=generator) * 0.9)
    return model


class ResNetish(nn.Module):
    """A stem, two residual blocks (one with a conv shortcut), pooling, flatten, dropout, LayerNorm head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(4, 4), BasicBlock(4, 6, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.0), nn.LayerNorm(6),
                                  nn.Linear(6, 5))

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class SeqNet(nn.Module):
    """A bidirectional LSTM, a GRU, self-attention with a residual, LayerNorm, mean over time, a linear head:
    written for ``(B, T, F)`` inputs, it also runs on a stack's ``(K, B, T, F)`` (time is dim -2)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(6, 6, batch_first=True)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h, _ = self.gru(self.lstm(x)[0])
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(dim=-2))


BUILDERS = {"mlp": fashion_mlp, "cnn": fashion_cnn, "resnet": ResNetish, "seq": SeqNet}
SHAPES = {"mlp": (1, 28, 28), "cnn": (1, 28, 28), "resnet": (1, 9, 11), "seq": (7, 4)}


def make_models(name, sparse=True, dtype=torch.float64):
    models = []
    for i in range(K):
        torch.manual_seed(i)
        m = BUILDERS[name]().to(dtype)
        if sparse:
            random_masks_(se.sparsify(m))
        for mod in m.modules():  # non-trivial running statistics and affine parameters
            if isinstance(mod, (nn.BatchNorm2d, nn.LayerNorm)):
                with torch.no_grad():
                    mod.weight.uniform_(0.5, 1.5), mod.bias.normal_()
                    if isinstance(mod, nn.BatchNorm2d):
                        mod.running_mean.normal_(), mod.running_var.uniform_(0.5, 2), mod.num_batches_tracked.fill_(i)
        models.append(m)
    return models


def backward_like_separate_models(y, models, x):
    """Backpropagate a random dy through the stacked output ``y`` and through each model on its input ``x[i]``;
    the outputs must match."""
    dy = torch.randn_like(y)
    y.backward(dy)
    for i, m in enumerate(models):
        yi = m(x[i])
        yi.backward(dy[i])
        torch.testing.assert_close(y[i], yi, rtol=1e-10, atol=1e-12)


def assert_models_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    ua, ub = se.sparse_modules(a), se.sparse_modules(b)
    assert [n for n, _ in ua] == [n for n, _ in ub]
    for (_, x), (_, y) in zip(ua, ub):
        assert torch.equal(x.mask_bits, y.mask_bits)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_round_trip_is_bit_identical(name):
    models = make_models(name)
    back = unstack(stack(models))
    assert len(back) == K
    for m, b in zip(models, back):
        assert type(b) is type(m)
        assert_models_equal(m, b)
        assert all(p.data_ptr() != q.data_ptr() for p, q in zip(m.parameters(), b.parameters()))


def test_dense_layers_come_back_dense_unless_masked_in_the_stack():
    models = make_models("mlp", sparse=False)
    stacked = stack(models)
    for _, layer in stacked.masked_layers():
        assert layer.mask.all()
    mask = torch.rand(stacked.module[1].weight.shape) < 0.5
    stacked.module[1].set_mask(mask)
    back = unstack(stacked)
    for i, b in enumerate(back):
        assert isinstance(b[1], se.SparseLinear) and torch.equal(b[1].mask, mask[i])
        assert torch.equal(b[1].weight, models[i][1].weight * mask[i])
        assert type(b[3]) is nn.Linear and torch.equal(b[3].weight, models[i][3].weight)


def test_weights_left_dense_stay_dense():
    """Weights that sparsify(exclude=...) left dense are no pruning units of the stack's model views (its
    pruners equal separate runs) and come back dense."""
    from sparse_engine.pruning.methods import OneShot
    from sparse_engine.stack.optim import StackedSGD
    from sparse_engine.stack.pruning import StackedPruners, model_views

    def build(seed):
        torch.manual_seed(seed)
        return se.sparsify(SeqNet().double(), exclude=["gru", "head"])

    models = [build(i) for i in range(K)]
    stacked = stack(models)
    units = [n for n, _ in se.sparse_modules(models[0])]
    assert "head" not in units and not any(n.startswith("gru") for n in units)
    assert all([n for n, _ in se.sparse_modules(v)] == units for v in model_views(stacked))
    StackedPruners(stacked, StackedSGD(stacked, lr=0.1), [lambda m, o: OneShot(m, o, 0.6)] * K)
    for i, (m, b) in enumerate(zip(models, unstack(stacked))):
        OneShot(m, torch.optim.SGD(m.parameters(), lr=0.1), 0.6)
        assert [n for n, _ in se.sparse_modules(b)] == units and type(b.head) is nn.Linear
        for (n, u), (_, v) in zip(se.sparse_modules(m), se.sparse_modules(b)):
            assert torch.equal(u.mask, v.mask), (i, n)
    other = build(1)
    other.lstm._init_masks(other.lstm.backend, names=("weight_ih_l0",))  # masks fewer of the LSTM's weights
    with pytest.raises(ValueError, match=r"models\[1\]: expected the sparse layers of models\[0\]"):
        stack([build(0), other])


@pytest.mark.parametrize("per_model_batches", [True, False], ids=["own-batches", "broadcast"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_train_step_equals_separate_models(name, per_model_batches):
    models = make_models(name)
    stacked = stack(models)
    x = torch.randn(K, 5, *SHAPES[name], dtype=torch.float64)
    if not per_model_batches:
        x = x[0].expand(K, *x.shape[1:])
    y = stacked(x) if per_model_batches else stacked(x[0], broadcast=True)
    backward_like_separate_models(y, models, x)
    back = unstack(stacked)
    for i, (m, b) in enumerate(zip(models, back)):  # running statistics updated per model
        for (n, t), (_, u) in zip(m.named_buffers(), b.named_buffers()):
            torch.testing.assert_close(t, u, rtol=1e-12, atol=1e-14, msg=n)
    grads = {n: p.grad for n, p in stacked.named_parameters()}
    for (n, p) in stacked.named_parameters():
        for i, m in enumerate(models):
            mp = m.get_parameter(n.removeprefix("module."))
            torch.testing.assert_close(grads[n][i], mp.grad, rtol=1e-10, atol=1e-12, msg=n)


def test_eval_mode_uses_running_statistics():
    models = [m.eval() for m in make_models("cnn")]
    stacked = stack(models)
    assert not stacked.training
    x = torch.randn(K, 4, 1, 28, 28, dtype=torch.float64)
    y = stacked(x)
    for i, m in enumerate(models):
        torch.testing.assert_close(y[i], m(x[i]), rtol=1e-10, atol=1e-12)


def test_dropout_is_independent_per_model():
    models = [nn.Sequential(nn.Linear(8, 64), nn.Dropout(0.5)) for _ in range(K)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    y = stack(models)(torch.randn(2, 8), broadcast=True)
    dropped = y == 0
    assert not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[1], dropped[2])


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    models = make_models("cnn", dtype=torch.float32)
    eager, compiled = stack(models), stack(models)
    x = torch.randn(K, 4, 1, 28, 28)
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    fn(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-5, msg=n)
    for (n, b), (_, c) in zip(eager.named_buffers(), compiled.named_buffers()):
        torch.testing.assert_close(c, b, msg=n)


class Scaled(nn.Module):
    """A module with children and a Parameter of its own, used in its forward."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.linear(x) * self.scale


class Positions(nn.Module):
    """A user's leaf layer with its own Parameter and forward (learned positions, as the zoo transformer's)."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(9, 4))

    def forward(self, x, scale=1.0):
        return x + scale * self.table[:x.shape[-2]]


def vmap_net():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.PReLU(4), nn.Flatten(2),
                         nn.Unflatten(2, (5, 4)), Positions(), nn.Flatten(), nn.Linear(80, 3))


def test_layers_without_a_stacked_version_run_with_vmap():
    """GroupNorm, PReLU and a user's leaf layer stack through torch.func.vmap: outputs and gradients equal the
    models run one by one (float64), round trips are bit-identical, compile works."""
    from sparse_engine.stack.layers import StackedVmap
    models = []
    for i in range(K):
        torch.manual_seed(40 + i)
        models.append(random_masks_(se.sparsify(vmap_net().double())))
    stacked = stack(models)
    assert [type(stacked.module[i]) for i in (1, 2, 5)] == [StackedVmap] * 3
    x = torch.randn(K, 6, 2, 5, 4, dtype=torch.float64)
    backward_like_separate_models(stacked(x), models, x)
    for n, p in stacked.named_parameters():
        for i, m in enumerate(models):
            torch.testing.assert_close(p.grad[i], m.get_parameter(n.removeprefix("module.")).grad, rtol=1e-10,
                                       atol=1e-12, msg=n)
    for m, b in zip(models, unstack(stacked)):
        assert_models_equal(m, b)
    assert type(unstack(stacked)[0][5]) is Positions
    pos = stacked.module[5]
    torch.testing.assert_close(pos(torch.zeros(K, 2, 3, 4, dtype=torch.float64), scale=2.0),
                               2 * pos.table[:, None, :3].expand(K, 2, 3, 4))  # keyword and non-tensor arguments
    with pytest.raises(ValueError, match=r"Positions \(stacked with vmap\): expected every tensor argument with "
                                         r"the model axis \(3\) first"):
        pos(torch.zeros(2, 3, 4))
    torch._dynamo.reset()
    compiled = torch.compile(stack(models), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), stacked(x), rtol=1e-10, atol=1e-12)


def test_vmap_layers_follow_train_and_eval():
    class Noisy(nn.Module):  # a user's leaf layer with a Parameter and dropout
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return nn.functional.dropout(x * self.scale, 0.5, self.training)

    stacked = stack([nn.Sequential(Noisy()) for _ in range(2)])
    x = torch.ones(2, 4, 8)
    assert (stacked(x) == 0).any()
    assert torch.equal(stacked.eval()(x), x)
    assert (stacked.train()(x) == 0).any()


def test_instance_norm_without_running_statistics_stacks_with_vmap():
    models = [nn.Sequential(nn.Conv2d(2, 4, 3), nn.InstanceNorm2d(4, affine=True)).double() for _ in range(K)]
    for m in models:
        with torch.no_grad():
            m[1].weight.uniform_(0.5, 1.5), m[1].bias.normal_()
    x = torch.randn(K, 3, 2, 6, 6, dtype=torch.float64)
    backward_like_separate_models(stack(models)(x), models, x)


def test_errors():
    with pytest.raises(TypeError, match="models: expected a list of nn.Module"):
        stack(fashion_mlp())
    with pytest.raises(ValueError, match="models: expected at least one model"):
        stack([])
    with pytest.raises(ValueError, match=r"models\[1\]: expected the architecture of models\[0\]"):
        stack([fashion_mlp(), fashion_cnn()])
    with pytest.raises(ValueError, match=r"models\[1\]: 'param 1.bias' is .*float64.* but .*float32"):
        stack([fashion_mlp(), fashion_mlp(num_classes=10).double()])
    instance_norm = lambda: nn.Sequential(nn.Conv1d(4, 4, 1), nn.InstanceNorm1d(4, affine=True,
                                                                               track_running_stats=True))
    with pytest.raises(TypeError, match="layer '1' of type InstanceNorm1d has no stacked version"):
        stack([instance_norm(), instance_norm()])  # buffers updated in place: no vmap fallback
    with pytest.raises(TypeError, match=r"layer '\(the model\)' of type Scaled has no stacked version"):
        stack([Scaled(), Scaled()])  # a Parameter of a module with children
    with pytest.raises(ValueError, match="layer '0': stacking Embedding with max_norm or sparse=True"):
        stack([se.sparsify(nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))) for _ in range(2)])
    tied = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    tied[1].weight = tied[0].weight
    with pytest.raises(ValueError, match="tied weights"):
        stack([tied])
    stacked = stack([fashion_mlp(), fashion_mlp()])
    with pytest.raises(ValueError, match=r"x: expected shape \(2, B, \.\.\.\)"):
        stacked(torch.randn(3, 1, 28, 28))
    with pytest.raises(TypeError, match="stacked: expected a StackedModel"):
        unstack(fashion_mlp())
    assert isinstance(stacked, StackedModel)


class Transpose(nn.Module):
    def forward(self, x):
        return x.transpose(1, 2)


def sequence_models(scale_grad_by_freq=False):
    """Embedding (padding_idx 0) -> Conv1d (zero and circular padding, stride, groups) -> Linear, sparse."""
    models = []
    for i in range(K):
        torch.manual_seed(10 + i)
        m = nn.Sequential(nn.Embedding(11, 6, padding_idx=0, scale_grad_by_freq=scale_grad_by_freq), Transpose(),
                          nn.Conv1d(6, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv1d(4, 4, 3, stride=2, padding=1, groups=2, padding_mode="circular"),
                          nn.Flatten(), nn.Linear(4 * 4, 5)).double()
        models.append(random_masks_(se.sparsify(m)))
    return models


@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_embedding_and_conv1d_stack_like_separate_models(scale_grad_by_freq):
    models = sequence_models(scale_grad_by_freq)
    stacked = stack(models)
    assert [type(m).__name__ for m in stacked.module][:3] == ["StackedEmbedding", "PerSample", "StackedConv1d"]
    for m, b in zip(models, unstack(stacked)):
        assert_models_equal(m, b)
    idx = torch.randint(0, 11, (K, 5, 7))
    idx[:, 0, :2] = 0  # padding tokens
    backward_like_separate_models(stacked(idx), models, idx)
    for n, p in stacked.named_parameters():
        for i, m in enumerate(models):
            mp = m.get_parameter(n.removeprefix("module."))
            torch.testing.assert_close(p.grad[i], mp.grad, rtol=1e-10, atol=1e-12, msg=n)
    emb = stacked.module[0]
    assert (emb.weight.grad[:, 0] == 0).all()  # the padding row
    assert (emb.weight.grad[~emb.mask] == 0).all()  # pruned entries: exact zeros
    layer = stacked.module[2]  # load_slice_ is unstacked's inverse
    layer.load_slice_(1, models[0][2])
    assert torch.equal(layer.weight[1], models[0][2].weight) and torch.equal(layer.mask[1], models[0][2].mask)


def test_compile_fullgraph_of_embedding_and_conv1d():
    torch._dynamo.reset()
    eager, compiled = stack(sequence_models()), stack(sequence_models())
    idx = torch.randint(0, 11, (K, 4, 7))
    torch.compile(compiled, fullgraph=True, backend="aot_eager")(idx).square().sum().backward()
    eager(idx).square().sum().backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)


class BilinearHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.bilinear = nn.Bilinear(2, 2, 5)

    def forward(self, h):
        return self.bilinear(h, torch.tanh(h))


def volume_net():
    """Conv3d (circular padding, groups) -> ConvTranspose3d -> ConvTranspose2d -> ConvTranspose1d (dilation,
    groups) -> a Bilinear of two inputs; reshapes as modules (a stacked model's forward sees (K, B, ...))."""
    return nn.Sequential(nn.Conv3d(2, 4, 3, padding=1, groups=2, padding_mode="circular"), nn.ReLU(),
                         nn.ConvTranspose3d(4, 3, 2, stride=2, bias=False), nn.Flatten(1, 2),
                         nn.ConvTranspose2d(12, 4, 3, stride=2, padding=1, output_padding=1), nn.Flatten(2),
                         nn.ConvTranspose1d(4, 2, 3, dilation=2, groups=2), nn.AdaptiveAvgPool1d(1), nn.Flatten(),
                         BilinearHead())


def volume_models():
    models = []
    for i in range(K):
        torch.manual_seed(20 + i)
        models.append(random_masks_(se.sparsify(volume_net().double())))
    return models


def test_conv3d_conv_transpose_and_bilinear_stack_like_separate_models():
    models = volume_models()
    stacked = stack(models)
    kinds = {type(m).__name__ for m in stacked.module.modules()}
    assert {"StackedConv3d", "StackedConvTranspose3d", "StackedConvTranspose2d", "StackedConvTranspose1d",
            "StackedBilinear"} <= kinds
    for m, b in zip(models, unstack(stacked)):
        assert_models_equal(m, b)
    x = torch.randn(K, 3, 2, 2, 3, 4, dtype=torch.float64)
    backward_like_separate_models(stacked(x), models, x)
    for n, p in stacked.named_parameters():
        for i, m in enumerate(models):
            torch.testing.assert_close(p.grad[i], m.get_parameter(n.removeprefix("module.")).grad, rtol=1e-10,
                                       atol=1e-12, msg=n)
    for name, layer in stacked.masked_layers():
        assert (layer.weight.grad[~layer.mask] == 0).all(), name  # pruned entries: exact zeros
    with pytest.raises(ValueError, match=rf"x: expected shape \({K}, B, C\) and 3 spatial"):
        stacked.module[0](torch.randn(K, 2, 2, 3, 4))
    with pytest.raises(ValueError, match="with the model axis first"):  # groups come from num_models, not x
        stacked.module[0](torch.randn(K + 1, 2, 2, 3, 4, 3))
    with pytest.raises(ValueError, match=r"x2: expected shape"):
        stacked.module[-1].bilinear(torch.randn(K, 2, 2), torch.randn(K, 2, 3))


def test_compile_fullgraph_of_conv3d_conv_transpose_and_bilinear():
    torch._dynamo.reset()
    eager, compiled = stack(volume_models()), stack(volume_models())
    x = torch.randn(K, 3, 2, 2, 3, 4, dtype=torch.float64)
    torch.compile(compiled, fullgraph=True, backend="aot_eager")(x).square().sum().backward()
    eager(x).square().sum().backward()
    for (n, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=n)
