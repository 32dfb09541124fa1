"""A model-level call that raises leaves the model and the optimizer exactly as they were.

For each public model-level function (prune_, global_magnitude_prune_, obs_layerwise, chita,
chita_plus_plus, every pruner's construction, step() and on_epoch_end()), many bad inputs, and
failures injected at every forward pass the call makes (a module of the model that raises on
its n-th call; a data loader that fails): weights, masks, buffers, module attributes, gradients
and the optimizer's state, param_groups, hooks and mask_optimizers are compared bit for bit
(tests/model_state.py). And restore_on_error itself: parameters keep their identity,
mask_version only increases, mask_optimizer stays consistent.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_state import ModelState, same_bits
from sparse_engine import mask_optimizer, sparse_modules, sparsify
from sparse_engine.nn.mask_optimizer import installed_maskers
from sparse_engine.pruning import (FGGP, GMP, IMP, Cyclical, OneShot, chita, chita_plus_plus, global_magnitude_prune_,
                                   obs_layerwise, prune_, restore_on_error)

NAN, INF = float("nan"), float("inf")


class Flaky(nn.Module):
    """The identity, raising on its ``fail_at``-th call: a failure where the library runs the model."""

    def __init__(self):
        super().__init__()
        self.calls, self.fail_at = 0, None

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("injected failure")
        return x


def gen(seed):
    return torch.Generator().manual_seed(seed)


X = torch.randn(16, 6, generator=gen(1))
Y = torch.randint(0, 4, (16,), generator=gen(2))
BATCHES = [(X[:8], Y[:8]), (X[8:], Y[8:])]


def model():
    torch.manual_seed(0)
    return sparsify(nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), Flaky(), nn.Linear(8, 5), nn.ReLU(),
                                  nn.Linear(5, 4)))


def flaky(m) -> Flaky:
    return m[3]


def trained(masker: bool = True):
    """A 25%-pruned model after two AdamW steps (optimizer state, BatchNorm statistics and .grad
    are all non-trivial); the optimizer keeps its mask_optimizer only if ``masker``."""
    m = model()
    prune_(m, 0.25)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    handle = mask_optimizer(opt, m)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(m(X), Y).backward()
        opt.step()
    if not masker:
        handle.remove()
    return m, opt


def nan_in_last_layer(m):
    """A NaN weight at a kept position of the last sparse layer."""
    r, c = m[6].mask.nonzero()[-1].tolist()
    with torch.no_grad():
        m[6].weight[r, c] = NAN
    return m


def flaky_loss(fail_at):
    calls = []

    def loss(out, target):
        calls.append(1)
        if len(calls) == fail_at:
            raise RuntimeError("injected loss failure")
        return F.cross_entropy(out, target)
    return loss


class FailingLoader:
    """A re-iterable list of batches whose ``fail_at``-th batch (over all passes) raises."""

    def __init__(self, batches, fail_at):
        self.batches, self.fail_at, self.served = batches, fail_at, 0

    def __iter__(self):
        for b in self.batches:
            self.served += 1
            if self.served == self.fail_at:
                raise RuntimeError("injected loader failure")
            yield b


def bad_lr_schedule(opt, total):
    torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5)          # sets lr and initial_lr ...
    raise RuntimeError("injected scheduler failure")              # ... then fails


def lr_schedule_failing_while_injecting(m):
    """An IMP ``lr_schedule`` that fails while ``flaky(m)`` has a failure to inject."""
    def make(opt, total):
        if flaky(m).fail_at is not None:
            return bad_lr_schedule(opt, total)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / (2 * total))
    return make


# ---- bad inputs: (id, call(model, optimizer)) -- every call raises -----------------------------

GMP_ARGS = (0.6, 0, 4, 2)
BAD_CALLS = {
    # prune_
    "prune-sparsity-nan": lambda m, o: prune_(m, NAN),
    "prune-sparsity-inf": lambda m, o: prune_(m, INF),
    "prune-sparsity-1": lambda m, o: prune_(m, 1.0),
    "prune-sparsity-bool": lambda m, o: prune_(m, True),
    "prune-sparsity-str": lambda m, o: prune_(m, "0.5"),
    "prune-below-current": lambda m, o: prune_(m, 0.1),
    "prune-score-unknown": lambda m, o: prune_(m, 0.5, "nope"),
    "prune-allocation-unknown": lambda m, o: prune_(m, 0.5, allocation="nope"),
    "prune-allocation-dict-nan": lambda m, o: prune_(m, 0.5, allocation={"0": NAN}),
    "prune-allocation-dict-name": lambda m, o: prune_(m, 0.5, allocation={"zz": 0.5}),
    "prune-granularity-nm-columns": lambda m, o: prune_(m, 0.5, granularity="2:4"),
    "prune-granularity-block": lambda m, o: prune_(m, 0.5, granularity="4x4"),
    "prune-exclude-int": lambda m, o: prune_(m, 0.5, exclude=3),
    "prune-exclude-all": lambda m, o: prune_(m, 0.5, exclude="*"),
    "prune-min-density-nan": lambda m, o: prune_(m, 0.5, min_density=NAN),
    "prune-min-density-too-high": lambda m, o: prune_(m, 0.5, "magnitude", "uniform", min_density=0.9),
    "prune-regrow-str": lambda m, o: prune_(m, 0.5, regrow="yes"),
    "prune-wanda-no-calib": lambda m, o: prune_(m, 0.5, "wanda"),
    "prune-wanda-nan-calib": lambda m, o: prune_(m, 0.5, "wanda", calib_data=torch.full((4, 6), NAN)),
    "prune-scores-nan": lambda m, o: prune_(m, 0.5, {n: torch.full_like(l.weight, NAN) for n, l in sparse_modules(m)}),
    "prune-scores-missing": lambda m, o: prune_(m, 0.5, {"0": torch.rand(8, 6)}),
    "prune-unknown-input": lambda m, o: prune_(m, 0.5, bogus=1),
    "prune-synflow-shape": lambda m, o: prune_(m, 0.5, "synflow", input_shape=(0, 6)),
    "prune-grasp-temperature": lambda m, o: prune_(m, 0.5, "grasp", loss_fn=F.cross_entropy, data=(X, Y),
                                                   temperature=0.0),
    "prune-saliency-loss-fails": lambda m, o: prune_(m, 0.5, "saliency", loss_fn=flaky_loss(1), data=(X, Y)),
    "prune-fggp-regrow": lambda m, o: prune_(m, 0.5, "fggp", rate=2.0, regrow=True),
    "prune-nan-weights": lambda m, o: prune_(m, 0.5),
    "prune-synflow-nan-weights": lambda m, o: prune_(m, 0.5, "synflow", input_shape=(1, 6),
                                                     iterations=3),
    # global_magnitude_prune_
    "global-nan": lambda m, o: global_magnitude_prune_(m, NAN),
    "global-below-current": lambda m, o: global_magnitude_prune_(m, 0.1),
    # obs_layerwise
    "obs-nan-in-last-layer": lambda m, o: obs_layerwise(m, X, 0.5),
    "obs-nan-calib": lambda m, o: obs_layerwise(m, torch.full((4, 6), NAN), 0.5),
    "obs-calib-iterator": lambda m, o: obs_layerwise(m, iter([X]), 0.5),
    "obs-sparsity-nan": lambda m, o: obs_layerwise(m, X, NAN),
    "obs-pattern": lambda m, o: obs_layerwise(m, X, 0.5, pattern="2:4"),
    "obs-loader-fails-at-layer-3": lambda m, o: obs_layerwise(m, FailingLoader([X[:8], X[8:]], 5), 0.5),
    # chita, chita_plus_plus
    "chita-nan-in-last-layer": lambda m, o: chita(m, F.cross_entropy, (X, Y), 0.5, n_grads=8),
    "chita-l2-zero": lambda m, o: chita(m, F.cross_entropy, (X, Y), 0.5, n_grads=8, l2=0.0),
    "chita-no-data": lambda m, o: chita(m, F.cross_entropy, [], 0.5, n_grads=8),
    "chita++-nan-in-last-layer": lambda m, o: chita_plus_plus(m, F.cross_entropy, BATCHES, 0.5, stages=2,
                                                              n_grads=8),
    "chita++-loader-fails-in-stage-2": lambda m, o: chita_plus_plus(m, F.cross_entropy, FailingLoader(BATCHES, 2),
                                                                    0.6, stages=2, n_grads=8, grad_batch_size=8),
    # pruner constructors (the four first)
    "oneshot-below-current": lambda m, o: OneShot(m, o, 0.1),
    "imp-epochs-per-phase-0": lambda m, o: IMP(m, o, 0.5, 2, 0),
    "gmp-initial-above-sparsity": lambda m, o: GMP(m, o, 0.5, 0, 10, 1, initial=0.7),
    "oneshot-wanda-no-calib": lambda m, o: OneShot(m, o, 0.5, score="wanda"),
    "oneshot-exclude-int": lambda m, o: OneShot(m, o, 0.5, exclude=3),
    "oneshot-bn-data-bad": lambda m, o: OneShot(m, o, 0.5, bn_data=[torch.randn(4, 7)]),
    "oneshot-nan-weights": lambda m, o: OneShot(m, o, 0.5),
    "imp-sparsity-not-above": lambda m, o: IMP(m, o, 0.2, 2, 1),
    "imp-lr-options-bogus": lambda m, o: IMP(m, o, 0.5, 2, 1, lr_schedule="slr", steps_per_epoch=3,
                                             lr_options={"bogus": 1}),
    "imp-lr-schedule-fails": lambda m, o: IMP(m, o, 0.5, 2, 1, lr_schedule=bad_lr_schedule, steps_per_epoch=3),
    "imp-rewind-bad-key": lambda m, o: IMP(m, o, 0.5, 2, 1, rewind={"nope": torch.zeros(1)}),
    "imp-rewind-then-bn-fails": lambda m, o: IMP(m, o, 0.5, 2, 1, rewind=m.state_dict(),
                                                 bn_data=FailingLoader([X], 1)),
    "gmp-bad-frequency": lambda m, o: GMP(m, o, 0.6, 0, 5, 2),
    "gmp-recover-no-data": lambda m, o: GMP(m, o, *GMP_ARGS, recover=True),
    "cyclical-initial-above": lambda m, o: Cyclical(m, o, 0.5, 2, 10, initial=0.6),
    "cyclical-regrow-loss-fails": lambda m, o: Cyclical(m, o, 0.6, 2, 10, initial=0.3, loss_fn=flaky_loss(1),
                                                        data=(X, Y)),
    "fggp-rate": lambda m, o: FGGP(m, o, 0.6, 0, 4, 2, rate=0.5),
    "fggp-no-grad-at-0": lambda m, o: FGGP(m, o, 0.6, 0, 4, 2, rate=2.0, initial=0.4, loss_fn=flaky_loss(1),
                                           data=(X, Y)),
}


# Cases run on a model with a NaN weight in its last layer.
NAN_WEIGHT_CASES = {"prune-nan-weights", "prune-synflow-nan-weights", "obs-nan-in-last-layer",
                    "chita-nan-in-last-layer", "chita++-nan-in-last-layer", "oneshot-nan-weights"}


# Pruner constructors also run on an optimizer without mask_optimizer: they install one, then fail.
CASES_AND_MASKERS = [(case, True) for case in BAD_CALLS] + [
    (case, False) for case in BAD_CALLS if case.split("-")[0] in ("oneshot", "imp", "gmp", "cyclical", "fggp")]


@pytest.mark.parametrize("case, masker", CASES_AND_MASKERS,
                         ids=[f"{c}{'' if k else '-no-masker'}" for c, k in CASES_AND_MASKERS])
def test_a_call_that_raises_changes_nothing(case, masker):
    m, opt = trained(masker)
    if case in NAN_WEIGHT_CASES:
        nan_in_last_layer(m)
    before = ModelState(m, opt)
    with pytest.raises((ValueError, TypeError, RuntimeError)):
        BAD_CALLS[case](m, opt)
    # prune_ checks everything and computes every mask before it sets one: not even a mask version moves.
    before.assert_unchanged(allow_new_mask_versions=not case.startswith(("prune-", "global-")))


def test_nan_in_a_later_layer_leaves_earlier_layers_unpruned():
    """Issue 11, item 4: obs_layerwise raised only after it had rewritten the earlier layers."""
    for call in (lambda m: obs_layerwise(m, X, 0.5),
                 lambda m: chita(m, F.cross_entropy, (X, Y), 0.5, n_grads=8),
                 lambda m: chita_plus_plus(m, F.cross_entropy, BATCHES, 0.5, stages=2, n_grads=8)):
        m = nan_in_last_layer(model())
        before = ModelState(m)
        with pytest.raises(ValueError, match="NaN"):
            call(m)
        before.assert_unchanged()
        assert all(bool(layer.mask.all()) for _, layer in sparse_modules(m)), "a layer was left pruned"


@pytest.mark.parametrize("make", [
    lambda m, o: OneShot(m, o, 0.1),
    lambda m, o: IMP(m, o, 0.5, 2, 0),
    lambda m, o: GMP(m, o, 0.5, 0, 10, 1, initial=0.7),
    lambda m, o: OneShot(m, o, 0.5, score="wanda"),
], ids=["oneshot-below-current", "imp-epochs-0", "gmp-initial", "wanda-no-calib"])
def test_failed_construction_leaves_no_mask_optimizer(make):
    """Issue 11, item 5: the constructor had installed mask_optimizer's hooks before it raised."""
    m = model()
    prune_(m, 0.3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    hooks = (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks))
    with pytest.raises(ValueError):
        make(m, opt)
    assert installed_maskers(opt) == []
    assert (dict(opt._optimizer_step_pre_hooks), dict(opt._optimizer_step_post_hooks)) == hooks


# ---- failures injected at every forward pass of a call ------------------------------------------

FORWARD_CALLS = {
    "prune-saliency": lambda m, o: prune_(m, 0.5, "saliency", loss_fn=F.cross_entropy, data=BATCHES),
    "prune-wanda": lambda m, o: prune_(m, 0.5, "wanda", calib_data=[X[:8], X[8:]]),
    "prune-synflow": lambda m, o: prune_(m, 0.5, "synflow", input_shape=(1, 6), iterations=3),
    "obs": lambda m, o: obs_layerwise(m, [X[:8], X[8:]], 0.5),
    "chita": lambda m, o: chita(m, F.cross_entropy, BATCHES, 0.5, n_grads=16, grad_batch_size=2),
    "chita++": lambda m, o: chita_plus_plus(m, F.cross_entropy, BATCHES, 0.6, stages=2, n_grads=8,
                                            grad_batch_size=2),
    "oneshot-bn": lambda m, o: OneShot(m, o, 0.5, bn_data=[X[:8], X[8:]]),
    "imp-rewind-bn": lambda m, o: IMP(m, o, 0.5, 2, 1, rewind=m.state_dict(), bn_data=[X]),
    "cyclical-regrow": lambda m, o: Cyclical(m, o, 0.6, 2, 10, initial=0.3, loss_fn=F.cross_entropy, data=BATCHES),
}


def failure_points(calls: int) -> list[int]:
    """Which of a call's ``calls`` forward passes to fail: the first, the last and two between."""
    return sorted({1, calls, max(1, calls // 3), max(1, 2 * calls // 3)})


@pytest.mark.parametrize("case", list(FORWARD_CALLS))
def test_a_failure_at_any_forward_pass_changes_nothing(case):
    m, opt = trained()
    start = flaky(m).calls
    FORWARD_CALLS[case](m, opt)
    calls = flaky(m).calls - start
    assert calls >= 1
    for n in failure_points(calls):
        m, opt = trained()
        flaky(m).fail_at = flaky(m).calls + n
        before = ModelState(m, opt)
        with pytest.raises(RuntimeError, match="injected failure"):
            FORWARD_CALLS[case](m, opt)
        before.assert_unchanged()


# ---- pruners' step() and on_epoch_end() ---------------------------------------------------------

def pruner_state(p):
    return {k: v for k, v in vars(p).items() if isinstance(v, (int, float, bool, str, type(None)))}


def train_step(m, opt):
    opt.zero_grad()
    F.cross_entropy(m(X), Y).backward()
    opt.step()


# (make the pruner, the call that prunes: the step() with this step count, or on_epoch_end after one epoch)
STEPPED = {
    "gmp-bn-recalibration": (lambda m, o: GMP(m, o, *GMP_ARGS, bn_data=[X]), 2),
    "cyclical-regrow-bn": (lambda m, o: Cyclical(m, o, 0.6, 2, 4, initial=0.3, loss_fn=F.cross_entropy,
                                                 data=BATCHES, bn_data=[X]), 2),
    "oneshot-at-2-bn": (lambda m, o: OneShot(m, o, 0.6, at=2, bn_data=[X]), 2),
    "imp-phase-2-rewind-bn": (lambda m, o: IMP(m, o, 0.6, 2, 1, bn_data=[X], rewind=m.state_dict()), "epoch"),
    "imp-phase-2-lr-schedule": (lambda m, o: IMP(m, o, 0.6, 2, 1, lr_schedule=lr_schedule_failing_while_injecting(m),
                                                 steps_per_epoch=1), "epoch"),
}


def drive(case, fail_at=None):
    """Train and step the pruner up to its pruning call; with ``fail_at``, that call first fails at
    its ``fail_at``-th forward pass (checked to change nothing) and is then made again. Returns
    the model and optimizer after the call and one more training step, and the call's forwards."""
    make, at = STEPPED[case]
    m, opt = trained()
    pruner = make(m, opt)
    for _ in range(1 if at == "epoch" else at - 1):
        train_step(m, opt)
        pruner.step()
    if at != "epoch":
        train_step(m, opt)
    call = pruner.on_epoch_end if at == "epoch" else pruner.step
    if fail_at is not None:
        before, attrs = ModelState(m, opt), pruner_state(pruner)
        flaky(m).fail_at = flaky(m).calls + fail_at
        with pytest.raises(RuntimeError, match="injected"):
            call()
        before.assert_unchanged()
        assert pruner_state(pruner) == attrs
        flaky(m).fail_at = None
    start = flaky(m).calls
    assert call(), "the call was expected to prune"
    forwards = flaky(m).calls - start
    train_step(m, opt)
    return m, opt, forwards


def values(m, opt) -> dict:
    """Weights, buffers, masks, the optimizer's state tensors and learning rates, by name."""
    out = {f"model {k}": v for k, v in m.state_dict().items()}
    out.update({f"mask {n}": layer.mask_bits for n, layer in sparse_modules(m)})
    sd = opt.state_dict()
    out.update({f"optimizer state {i} {k}": v for i, st in sd["state"].items() for k, v in st.items()})
    out.update({f"lr {i}": torch.tensor(g["lr"]) for i, g in enumerate(sd["param_groups"])})
    return out


@pytest.mark.parametrize("case", list(STEPPED))
def test_a_failed_step_changes_nothing_and_its_retry_matches_an_uninterrupted_run(case):
    m_ref, opt_ref, forwards = drive(case)
    ref = values(m_ref, opt_ref)
    for n in failure_points(forwards) if forwards else [1]:  # the LR schedule case fails without a forward
        m, opt, _ = drive(case, n)
        # The retried run equals the uninterrupted one, also after one more optimizer step
        # (mask_optimizer stayed consistent through the restore).
        got = values(m, opt)
        assert list(got) == list(ref)
        diff = [k for k in ref if not same_bits(torch.as_tensor(got[k]), torch.as_tensor(ref[k]))]
        assert not diff, f"failure at forward {n}: differs after the retry: {diff}"


# ---- restore_on_error itself ---------------------------------------------------------------------

def test_restore_on_error_puts_back_objects_values_masks_and_optimizer():
    m, opt = trained()
    params = {n: p for n, p in m.named_parameters()}
    versions = {n: layer.mask_version for n, layer in sparse_modules(m)}
    before = ModelState(m, opt)
    with pytest.raises(KeyboardInterrupt):
        with restore_on_error(m, opt):
            m[0].set_mask(torch.zeros_like(m[0].weight, dtype=torch.bool))      # a mask and zeroed weights
            with torch.no_grad():
                m[4].weight.mul_(3.0)                                           # weights in place
            m[6].weight = nn.Parameter(torch.randn(4, 5))                      # a new Parameter object
            m[1].running_mean.fill_(7.0)                                        # a buffer
            m[1].register_buffer("extra", torch.ones(1))                       # a new buffer
            m[0].register_forward_hook(lambda *a: None)                        # a hook
            m.eval()                                                            # modes
            mask_optimizer(opt, m)                                              # a second masker
            torch.optim.lr_scheduler.StepLR(opt, 1)                             # initial_lr, wrapped step
            opt.param_groups[0]["lr"] = 5.0
            opt.state.clear()
            raise KeyboardInterrupt                                             # any exception, this one too
    before.assert_unchanged()
    assert all(p is params[n] for n, p in m.named_parameters()), "a Parameter object was replaced"
    # mask_version only increases: the restored layer has its old mask under a new version.
    assert m[0].mask_version > versions["0"]
    assert {n: layer.mask_version for n, layer in sparse_modules(m)}["4"] == versions["4"]
    # mask_optimizer stays consistent: training on keeps pruned weights at exact zeros.
    train_step(m, opt)
    for n, layer in sparse_modules(m):
        assert (layer.weight[~layer.mask] == 0).all(), f"layer {n}: a pruned weight moved"


def test_an_inner_block_restores_its_part_when_its_error_is_caught():
    m, opt = trained()
    with restore_on_error(m, opt):
        prune_(m, 0.5)
        after_outer = ModelState(m, opt)
        with pytest.raises(RuntimeError):
            with restore_on_error(m):
                obs_layerwise(m, X, 0.9)
                raise RuntimeError("caught below")
        after_outer.assert_unchanged()


def test_after_a_failed_construction_a_new_pruner_works():
    m, opt = trained(masker=False)
    with pytest.raises(ValueError):
        OneShot(m, opt, 0.1)
    pruner = OneShot(m, opt, 0.5)
    assert len(installed_maskers(opt)) == 1 and pruner.masked_optimizer is installed_maskers(opt)[0]
    assert abs(pruner.current_sparsity() - 0.5) < 0.01


def test_a_layer_with_several_masked_weights_is_restored_per_weight():
    """An LSTM masks four weights; each keeps its own mask version, and a restored one moves up."""
    torch.manual_seed(3)
    m = sparsify(nn.LSTM(5, 7, num_layers=2))
    (_, lstm), = [(n, u.module) for n, u in sparse_modules(m)][:1]
    units = lstm.masked_weights
    masks = {n: u.mask for n, u in units.items()}
    versions = {n: u.mask_version for n, u in units.items()}
    weights = {n: getattr(lstm, n).detach().clone() for n in units}
    with pytest.raises(RuntimeError, match="after one mask"):
        with restore_on_error(m):
            units["weight_hh_l0"].set_mask(torch.rand_like(lstm.weight_hh_l0) > 0.5)
            raise RuntimeError("after one mask")
    for n, u in units.items():
        assert torch.equal(u.mask, masks[n]) and torch.equal(getattr(lstm, n), weights[n]), n
    assert units["weight_hh_l0"].mask_version > versions["weight_hh_l0"]
    assert {n: u.mask_version for n, u in units.items() if n != "weight_hh_l0"} == \
        {n: v for n, v in versions.items() if n != "weight_hh_l0"}
