"""Per-model pruning on a stack: K models with different methods and targets, all masks selected in one
topk_mask call per pruning step, equal (exactly, float64) to K separate runs."""
import pytest
import torch
import torch.nn.functional as F

import sparse_engine as se
from sparse_engine.pruning.methods import FGGP, GMP, IMP, Cyclical, OneShot
from sparse_engine.pruning.select import granularity
from sparse_engine.stack import stack, unstack
from sparse_engine.stack.optim import StackedAdamW, StackedSGD, mask_stacked_optimizer
from sparse_engine.stack.pruning import StackedPruners, model_views
from test_stack import SHAPES, make_models

STEPS, EPOCH = 6, 3  # on_epoch_end every EPOCH steps
LRS = [0.05, 0.02, 0.01, 0.03, 0.04]
METHODS = {
    "oneshot": lambda m, o: OneShot(m, o, 0.7, at=2),
    "oneshot-erk": lambda m, o: OneShot(m, o, 0.6, allocation="erk"),
    "gmp": lambda m, o: GMP(m, o, 0.8, start_step=0, end_step=4, frequency=2),
    "gmp-uniform": lambda m, o: GMP(m, o, 0.5, start_step=1, end_step=5, frequency=2, allocation="uniform"),
    "imp-clr": lambda m, o: IMP(m, o, 0.75, phases=2, epochs_per_phase=1, lr_schedule="clr",
                                steps_per_epoch=EPOCH, lr_options={"max_lr": 0.05}),
    "imp-rewind": lambda m, o: IMP(m, o, 0.6, phases=2, epochs_per_phase=1, rewind=m.state_dict()),
    "cyclical": lambda m, o: Cyclical(m, o, 0.6, cycles=2, total_steps=STEPS, frequency=1),
    "fggp": lambda m, o: FGGP(m, o, 0.7, start_step=1, end_step=5, frequency=2, rate=2.0),
}


def train(model_or_stack, opt, pruner, batches, stacked):
    for t, (x, y) in enumerate(batches):
        if stacked:
            out = model_or_stack(x)
            loss = sum(F.cross_entropy(out[k], y[k]) for k in range(x.shape[0]))
        else:
            loss = F.cross_entropy(model_or_stack(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        pruner.step()
        if (t + 1) % EPOCH == 0:
            pruner.on_epoch_end()


def distinct_models(name, k, seed):
    """k dense-masked sparse models of ``name`` with distinct weights (make_models repeats its K seeds)."""
    models = [se.sparsify(m) for m in (make_models(name, sparse=False) + make_models(name, sparse=False))[:k]]
    for i, m in enumerate(models):
        torch.manual_seed(seed + i)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.01)
    return models


def batches_for(name, k):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(k, 6, *SHAPES[name], generator=g, dtype=torch.float64),
             torch.randint(0, 5, (k, 6), generator=g)) for _ in range(STEPS)]


OPTIMIZERS = {  # (one model's, the stack's); AdamW: torch's single-tensor algorithm, as the stack's
    "sgd": (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9), lambda p, lrs: StackedSGD(p, lr=lrs, momentum=0.9)),
    "adamw": (lambda p, lr: torch.optim.AdamW(p, lr=lr / 10, foreach=False),
              lambda p, lrs: StackedAdamW(p, lr=[lr / 10 for lr in lrs])),
}


@pytest.mark.parametrize("model, methods, optimizer", [
    ("resnet", ["oneshot", "gmp", "imp-clr", "imp-rewind"], "sgd"),
    ("resnet", ["cyclical", "fggp", "gmp-uniform", "oneshot-erk"], "sgd"),
    ("resnet", ["imp-rewind", "gmp", "imp-rewind", "oneshot"], "adamw"),
    ("seq", ["imp-rewind", "gmp", "fggp", "oneshot-erk"], "adamw")],
    ids=["oneshot-gmp-imp-imprewind", "cyclical-fggp-gmp-erk", "adamw-imprewind-gmp", "lstm-gru-attention"])
def test_stacked_pruning_equals_separate_runs(model, methods, optimizer, monkeypatch):
    """The stack's pruners equal separate runs; with AdamW, IMP's rewinding clears its own model's moments
    and step count (the models' step counts then differ) and leaves the others' as they are. The "seq" model
    has recurrent and attention layers: several masked weights per layer, and a stacked layer inside another
    (the attention's out_proj)."""
    make_single, make_stacked = OPTIMIZERS[optimizer]
    k = len(methods)
    models = distinct_models(model, k, seed=50)
    stacked = stack(models)
    batches = batches_for(model, k)

    calls = []
    original = granularity.topk_mask
    monkeypatch.setattr(granularity, "topk_mask", lambda *a, **kw: calls.append(1) or original(*a, **kw))

    separate = []
    for i, (m, name) in enumerate(zip(models, methods)):
        opt = make_single(m.parameters(), LRS[i])
        separate.append(METHODS[name](m, opt))
        train(m, opt, separate[-1], [(x[i], y[i]) for x, y in batches], stacked=False)
    separate_calls = len(calls)
    calls.clear()

    opt = make_stacked(stacked, LRS[:k])
    mask_stacked_optimizer(opt, stacked)
    pruners = StackedPruners(stacked, opt, [METHODS[n] for n in methods])
    train(stacked, opt, pruners, batches, stacked=True)
    if optimizer == "adamw":  # the rewound models' step counts restarted at the phase boundary
        steps = {tuple(s["step"].tolist()) for s in opt.state.values()}
        rewound = [m == "imp-rewind" for m in methods]
        assert steps == {tuple(STEPS - EPOCH if r else STEPS for r in rewound)}, steps

    assert len(calls) == pruners.select_calls
    assert pruners.select_calls < separate_calls, "selections of different models must share topk_mask calls"
    for i, (m, b) in enumerate(zip(models, unstack(stacked))):
        for (n, x), (_, u) in zip(se.sparse_modules(m), se.sparse_modules(b)):
            assert torch.equal(x.mask, u.mask), f"model {i} ({methods[i]}), layer {n}"
        for (n, t), (_, u) in zip(m.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(u, t, rtol=1e-9, atol=1e-11, msg=f"model {i}: {n}")
    for i, (p, q) in enumerate(zip(separate, pruners.pruners)):
        assert q.state_dict().keys() == p.state_dict().keys()
        assert (q.sparsity, q.step_count, q.epoch) == (p.sparsity, p.step_count, p.epoch), f"model {i}"


def test_one_select_call_per_pruning_step(monkeypatch):
    stacked = stack([se.sparsify(m) for m in make_models("mlp", sparse=False)])
    opt = StackedSGD(stacked, lr=0.01)
    calls = []
    original = granularity.topk_mask
    monkeypatch.setattr(granularity, "topk_mask", lambda *a, **kw: calls.append(kw["group"]) or original(*a, **kw))
    pruners = StackedPruners(stacked, opt, [lambda m, o, s=s: OneShot(m, o, s, allocation="uniform")
                                            for s in (0.5, 0.7, 0.9)])
    assert len(calls) == 1
    assert len(set(calls[0])) == 3 * 3  # one group per model and per layer (uniform allocation)
    for _, layer in stacked.masked_layers():
        density = layer.mask.flatten(1).double().mean(1)
        assert density.tolist() == pytest.approx([0.5, 0.3, 0.1], abs=0.01)
    assert pruners.select_calls == 1


def test_model_views_share_storage():
    stacked = stack(make_models("cnn"))
    views = model_views(stacked)
    layer = stacked.module[0]
    mask = torch.rand(layer.weight.shape[1:]) < 0.5
    views[1][0].set_mask(mask)
    assert torch.equal(layer.mask[1], mask)
    assert (layer.weight[1][~mask] == 0).all()
    assert views[2][1].running_mean.data_ptr() == stacked.module[1].running_mean[2].data_ptr()


def test_errors():
    stacked = stack(make_models("mlp"))
    opt = StackedSGD(stacked, lr=0.01)
    with pytest.raises(ValueError, match="methods: expected 3"):
        StackedPruners(stacked, opt, [METHODS["gmp"]])
    with pytest.raises(RuntimeError, match="model 1: its pruner raised ValueError: sparsity"):
        StackedPruners(stacked, opt, [lambda m, o: OneShot(m, o, 0.5), lambda m, o: OneShot(m, o, 1.5),
                                      lambda m, o: OneShot(m, o, 0.5)])


def test_random_methods_with_rng_streams_equal_separate_runs():
    """Methods that draw from torch's global RNG (random scores, SET's growth, PAI's shuffle and reinit, RigL's
    random initial masks) give each model of a stack the masks and weights of a separate run seeded like its
    stream; the global RNG outside the pruners is left alone."""
    from sparse_engine.pruning.methods import SET, PruneAtInit, RigL
    x0, y0 = torch.randn(6, *SHAPES["mlp"], dtype=torch.float64), torch.randint(0, 5, (6,))
    methods = [
        lambda m, o: OneShot(m, o, 0.7, at=2, score="random"),
        lambda m, o: PruneAtInit(m, o, 0.8, "saliency", shuffle=True, reinit=True, loss_fn=F.cross_entropy,
                                 data=(x0, y0)),
        lambda m, o: SET(m, o, 0.75, STEPS, delta_t=2, drop_fraction=0.5, allocation="erk"),
        lambda m, o: RigL(m, o, 0.6, STEPS, loss_fn=F.cross_entropy, data=(x0, y0), delta_t=2, allocation="erk"),
    ]
    k = len(methods)
    models = distinct_models("mlp", k, seed=70)
    stacked = stack(models)
    batches = batches_for("mlp", k)
    separate = []
    for i, (m, make) in enumerate(zip(models, methods)):
        torch.manual_seed(100 + i)
        opt = torch.optim.SGD(m.parameters(), lr=LRS[i], momentum=0.9)
        separate.append(make(m, opt))
        train(m, opt, separate[-1], [(x[i], y[i]) for x, y in batches], stacked=False)
    streams = []
    for i in range(k):
        torch.manual_seed(100 + i)
        streams.append(torch.get_rng_state())
    torch.manual_seed(5)
    outer = torch.get_rng_state()
    opt = StackedSGD(stacked, lr=LRS[:k], momentum=0.9)
    mask_stacked_optimizer(opt, stacked)
    pruners = StackedPruners(stacked, opt, methods, rng_streams=streams)
    assert torch.equal(torch.get_rng_state(), outer)
    train(stacked, opt, pruners, batches, stacked=True)
    assert torch.equal(torch.get_rng_state(), outer)
    for i, (m, b) in enumerate(zip(models, unstack(stacked))):
        for (n, a), (_, u) in zip(se.sparse_modules(m), se.sparse_modules(b)):
            assert torch.equal(a.mask, u.mask), f"model {i}, layer {n}"
        for (n, t), (_, u) in zip(m.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(u, t, rtol=1e-9, atol=1e-11, msg=f"model {i}: {n}")
    with pytest.raises(ValueError, match="rng_streams: expected 4"):
        StackedPruners(stacked, opt, methods, rng_streams=streams[:2])
