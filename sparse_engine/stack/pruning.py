"""Per-model pruning of a stacked model: every pruning method of ``sparse_engine.pruning.methods`` runs on
each model with its own targets, and all K models' masks are selected in **one** ``topk_mask`` call.

**Design.** The pruners are not rewritten for stacks. :func:`model_views` gives K ordinary sparse
models whose Parameters, buffers and masks are *views* of the stack's slices ``[k]``: a pruner
constructed on view k (with a stand-in optimizer holding model k's learning rates) computes its
schedule, scores and allocation exactly as in a separate run, and ``set_mask`` on view k writes
model k's mask and zeros into the stack. :class:`StackedPruners` runs the K pruners' calls
(construction, ``step()``, ``on_epoch_end()``) in one thread per model, the threads taking turns in
model order, and batches their selections: ``prune_``'s ``select`` (the ``topk_mask`` call) waits
until every model still running has reached its own, then one ``topk_mask`` call selects all of
them, one group per model and per layer where the allocation has per-layer groups (group ids are
offset per model), and each model gets its masks back. Groups are selected independently and in the
same order as alone, so the masks equal K separate runs' exactly. Models that do not prune at a step
simply finish; methods with several selection rounds (SynFlow) batch round by round; a step at which
no pruner selects (``Pruner.step_selects``) runs without threads. Random draws (random scores, SET's
growth, reinitialisation) are deterministic, and with ``rng_streams`` each model draws from its own
torch RNG stream, as in a separate run.

Everything the pruners do besides selection also reaches the stack: weights rewound or
zeroed in place (views), BatchNorm recalibration (view buffers), learning rates that IMP's
retraining schedules set on the stand-in optimizer (copied into the stacked optimizer's
per-model ``lr``), and a cleared optimizer state (IMP's rewinding; model k's slice of every state
tensor is zeroed: a :class:`~sparse_engine.stack.optim.StackedSGD`'s momentum, which is what a
fresh buffer gives with zero dampening, and a :class:`~sparse_engine.stack.optim.StackedAdamW`'s
moments and step count, which is a fresh AdamW state).
"""
import copy
import threading
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from sparse_engine.nn.masked_module import mask_buffer_name
from sparse_engine.nn.sparsify import sparse_modules
from sparse_engine.pruning.select import granularity as _granularity
from sparse_engine.pruning.select import prune as _prune_module
from sparse_engine.stack.convert import StackedModel, stacked_layers
from sparse_engine.stack.layers import StackedLayer, StackedMaskedLayer
from sparse_engine.stack.optim import StackedAdamW, StackedSGD, _StackedOptimizer


def _view_layer(layer: StackedLayer, i: int) -> nn.Module:
    out = copy.deepcopy(layer._prototype)
    for name, p in layer._parameters.items():
        if p is not None:
            out._parameters[name] = nn.Parameter(p.detach()[i], requires_grad=p.requires_grad)
    for name, b in layer.models_tensors():
        if name in layer._buffers:
            out._buffers[name] = b[i]
    for name, child in layer._modules.items():
        out._modules[name] = _view_layer(child, i)
    if isinstance(layer, StackedMaskedLayer):  # the model's own pruning units (its dense weights stay dense)
        out = layer.as_sparse(out, layer.pruned_names)
        for n in layer.pruned_names:
            out._buffers[mask_buffer_name(n)] = layer.mask_bits_of(n)[i]
    return out


def model_views(stacked: StackedModel) -> list[nn.Module]:
    """K ordinary sparse models whose Parameters, buffers and masks are views of ``stacked``'s slices:
    what is written into view k (``set_mask``, in-place weight changes) is written into model k of the stack."""
    if not isinstance(stacked, StackedModel):
        raise TypeError(f"stacked: expected a StackedModel, got {type(stacked).__name__}")
    layers = [m for _, m in stacked_layers(stacked.module)]
    views = []
    for i in range(stacked.num_models):
        memo = {id(m): (_view_layer(m, i) if isinstance(m, StackedLayer) else m.unstacked(i)) for m in layers}
        view = copy.deepcopy(stacked.module, memo)
        view.train(stacked.training)
        views.append(view)
    return views


class _BatchedSelect:
    """Runs the K models' pruner calls in worker threads **one at a time, in model order**, and answers their
    ``select`` calls with one ``topk_mask`` call.

    A thread runs while it holds the turn; it passes the turn on (to the next model that can run) when it
    waits for a selection or ends. When every model still running waits, one ``topk_mask`` call answers
    them all and the turn goes round again in model order. With ``streams`` (one torch RNG state per
    model), the thread with the turn draws from its own model's stream: each model's random draws are
    those of a separate run, whatever the threads' timing."""

    def __init__(self, workers: list, streams: Optional[dict] = None):
        self.cv = threading.Condition()
        self.running = len(workers)
        self.queue = list(workers)
        self.current = self.queue.pop(0) if self.queue else None
        self.streams = streams
        self.waiting: dict[int, tuple] = {}
        self.results: dict[int, object] = {}
        self.calls = 0

    def take(self, k: int) -> None:
        """Block until model ``k`` has the turn (then draw from its stream)."""
        with self.cv:
            while self.current != k:
                self.cv.wait()
        if self.streams is not None:
            torch.set_rng_state(self.streams[k])

    def _give(self, k: int) -> None:
        if self.streams is not None:
            self.streams[k] = torch.get_rng_state()
        self.current = self.queue.pop(0) if self.queue else None
        if self.current is None:
            self._run_if_all_waiting()
        self.cv.notify_all()

    def select(self, k: int, scores, ks, group, names):
        with self.cv:
            self.waiting[k] = (list(scores), list(ks), list(group), list(names))
            self._give(k)
            while k not in self.results or self.current != k:
                self.cv.wait()
            result = self.results.pop(k)
        if self.streams is not None:
            torch.set_rng_state(self.streams[k])
        if isinstance(result, BaseException):
            raise result
        return result

    def finished(self, k: int) -> None:
        with self.cv:
            self.running -= 1
            self._give(k)

    def _run_if_all_waiting(self) -> None:
        if not self.waiting or len(self.waiting) < self.running:
            return
        batch, self.waiting = sorted(self.waiting.items()), {}
        scores, ks, group, names, spans, offset = [], [], [], [], [], 0
        for k, (s, kk, g, n) in batch:
            spans.append((k, len(scores), len(s)))
            scores += s
            ks += kk
            group += [offset + gi for gi in g]
            names += [f"model {k}: {x}" for x in n]
            offset += len(kk)
        try:
            masks = _ORIGINAL_SELECT(scores, ks, group, names)
            self.calls += 1
            for k, start, count in spans:
                self.results[k] = masks[start:start + count]
        except Exception:  # e.g. NaN scores of one model: each model selects alone and gets its own result or error
            for k, (s, kk, g, n) in batch:
                try:
                    self.results[k] = _ORIGINAL_SELECT(s, kk, g, n)
                    self.calls += 1
                except Exception as e:  # noqa: BLE001 - handed to the model's thread, which raises it
                    self.results[k] = e
        self.queue = [k for k, _ in batch]
        self.current = self.queue.pop(0)


_ORIGINAL_SELECT = _granularity.select
_local = threading.local()
_install_lock = threading.Lock()


def _dispatching_select(scores, ks, group, names):
    batch = getattr(_local, "batch", None)
    if batch is None:
        return _ORIGINAL_SELECT(scores, ks, group, names)
    return batch.select(_local.index, scores, ks, group, names)


class StackedPruners:
    """K pruners, one per model of ``stacked``, selecting their masks together.

    Args:
        stacked: the stacked model.
        optimizer: its optimizer (``StackedSGD``/``StackedAdamW``: per-model learning rates reach the
            pruners' stand-in optimizers, and schedules the pruners set come back).
        methods: one function per model, ``(model, optimizer) -> Pruner``, e.g.
            ``lambda m, o: GMP(m, o, 0.9, start_step=0, end_step=100, frequency=10)``; it is called with
            the model's view (``model_views``) and its stand-in optimizer.

        rng_streams: one torch CPU RNG state per model (``torch.get_rng_state()``), or None. The K pruners'
            calls run one at a time in model order (threads only take turns), so their draws from torch's
            global RNG are deterministic either way; with streams, model k's draws come from its own stream
            (as in a separate run seeded that way) and the global RNG outside the pruners' calls is left
            alone (the stacked model's dropout draws from it). ``model_rng(k)`` runs code on model k's stream.
        isolate_failures: False (default): an error of any model's pruner is raised (naming the model).
            True: the model's pruner is stopped, its error kept in ``failed[k]``, and the other models go on
            (the sweep runner marks that trial failed); ``stop(k)`` stops a model's pruner by hand.

    Call ``step()`` after ``optimizer.step()`` and ``on_epoch_end()`` after each epoch, as for one
    pruner. ``select_calls`` counts the ``topk_mask`` calls made (one per batched selection).
    """

    def __init__(self, stacked: StackedModel, optimizer: Optimizer, methods: Sequence[Callable],
                 rng_streams: Optional[Sequence[Tensor]] = None, isolate_failures: bool = False):
        if not isinstance(stacked, StackedModel):
            raise TypeError(f"stacked: expected a StackedModel, got {type(stacked).__name__}")
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        methods = list(methods)
        if len(methods) != stacked.num_models:
            raise ValueError(f"methods: expected {stacked.num_models} (one per model), got {len(methods)}")
        self.stacked, self.optimizer = stacked, optimizer
        self.views = model_views(stacked)
        names = {id(p): n for n, p in stacked.named_parameters()}
        self.stand_ins = []
        for view in self.views:
            vparams = dict(view.named_parameters())
            groups = [{"params": [vparams[names[id(p)].removeprefix("module.")] for p in g["params"]], "lr": 0.0}
                      for g in optimizer.param_groups]
            self.stand_ins.append(torch.optim.SGD(groups, lr=0.0))
        self._lrs_to_stand_ins()
        self.select_calls = 0
        self.isolate_failures = isolate_failures
        self.streams = None
        if rng_streams is not None:
            rng_streams = list(rng_streams)
            if len(rng_streams) != stacked.num_models or not all(isinstance(t, Tensor) for t in rng_streams):
                raise ValueError(f"rng_streams: expected {stacked.num_models} torch RNG states (one per model)")
            self.streams = {k: t.clone() for k, t in enumerate(rng_streams)}
        self.active = set(range(stacked.num_models))
        self.failed: dict[int, BaseException] = {}
        self.pruners = self._run_all(lambda k: methods[k](self.views[k], self.stand_ins[k]))

    # -- the training loop hooks --------------------------------------------------------------

    def step(self) -> list[bool]:
        """``pruner.step()`` of every model; returns whether each model's masks changed."""
        # A step that no pruner selects masks at (their schedules say so: Pruner.step_selects) runs the K calls
        # one after another in this thread: the threads are only needed to batch selections, and cost
        # milliseconds a step (thread starts, the GIL, OpenMP's spinning workers).
        quiet = all(hasattr(p, "step_selects") and not p.step_selects(p.step_count + 1)
                    for k, p in enumerate(self.pruners) if k in self.active)
        return self._run_all(lambda k: self.pruners[k].step(), threaded=not quiet)

    def on_epoch_end(self) -> list[bool]:
        return self._run_all(lambda k: self.pruners[k].on_epoch_end())

    @contextmanager
    def model_rng(self, k: int) -> Iterator[None]:
        """Run the block on model ``k``'s RNG stream (``rng_streams``): what it draws advances that stream, and
        the global RNG is as before afterwards. Without streams, a no-op."""
        if self.streams is None:
            yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self.streams[k])
        try:
            yield
        finally:
            self.streams[k] = torch.get_rng_state()
            torch.set_rng_state(outer)

    def stop(self, k: int) -> None:
        """Stop model ``k``'s pruner: its calls are skipped from now on (a failed model of a sweep)."""
        self.active.discard(k)

    def state_dict(self) -> dict:
        return {"pruners": [p.state_dict() for p in self.pruners]}

    def load_state_dict(self, state: dict) -> None:
        for p, s in zip(self.pruners, state["pruners"]):
            p.load_state_dict(s)

    # -- machinery ----------------------------------------------------------------------------

    def _lr_of(self, group: dict, k: int) -> float:
        lr = group["lr"]
        return float(lr[k]) if isinstance(lr, Tensor) else float(lr)

    def _lrs_to_stand_ins(self) -> None:
        for k, o in enumerate(self.stand_ins):
            for g, sg in zip(self.optimizer.param_groups, o.param_groups):
                sg["lr"] = self._lr_of(g, k)

    def _lrs_from_stand_ins(self) -> None:
        if not isinstance(self.optimizer, _StackedOptimizer):
            return
        for i, g in enumerate(self.optimizer.param_groups):
            g["lr"] = torch.tensor([o.param_groups[i]["lr"] for o in self.stand_ins], dtype=torch.float64)

    def _param_views(self) -> list:
        """``[(stacked parameter, [its view in model k for every k])]``, built once."""
        if not hasattr(self, "_views_of"):
            self._views_of = [(p, [view.get_parameter(name) for view in self.views])
                              for name, p in self.stacked.module.named_parameters()]
        return self._views_of

    def _sync_grads(self, clear: bool = False) -> None:
        """The views' gradients: model k's slices of the stack's (None with ``clear``)."""
        for p, views in self._param_views():
            g = None if clear else p.grad
            for k, v in enumerate(views):
                v.grad = None if g is None else g[k]

    def _versions(self) -> list[int]:
        if not hasattr(self, "_view_layers"):
            self._view_layers = [[u for _, u in sparse_modules(view)] for view in self.views]
        return [sum(u.mask_version for u in layers) for layers in self._view_layers]

    @torch.no_grad()
    def _clear_state_if_cleared(self, sentinels) -> None:
        """A pruner that cleared its optimizer's state (IMP rewinding) clears model k's slice of the stack's."""
        for k, (o, sentinel) in enumerate(zip(self.stand_ins, sentinels)):
            if sentinel in o.state:
                del o.state[sentinel]
                continue
            if self.optimizer.state and not isinstance(self.optimizer, (StackedSGD, StackedAdamW)):
                raise NotImplementedError(f"model {k}: its pruner cleared the optimizer state; clearing one model's "
                                          f"state is supported for StackedSGD and StackedAdamW, not "
                                          f"{type(self.optimizer).__name__}")
            for state in self.optimizer.state.values():
                for v in state.values():
                    if isinstance(v, Tensor) and v.dim() > 0:
                        v[k].zero_()

    def _run_all(self, call: Callable[[int], object], threaded: bool = True) -> list:
        k_models = self.stacked.num_models
        running = sorted(self.active)
        self._lrs_to_stand_ins()
        self._sync_grads()
        sentinel = torch.zeros(())
        for o in self.stand_ins:
            o.state[sentinel] = {}
        before = self._versions()
        outer = torch.get_rng_state() if self.streams is not None else None
        batch = _BatchedSelect(running, self.streams)
        results, errors = [None] * k_models, [None] * k_models

        def work(k):
            _local.batch, _local.index = batch, k
            try:
                batch.take(k)
                results[k] = call(k)
            except BaseException as e:
                errors[k] = e
            finally:
                _local.batch = None
                batch.finished(k)

        with _install_lock, warnings.catch_warnings():
            # the stand-in optimizers never step, which the pruners' LR schedulers would warn about
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step")
            try:
                if not threaded:  # the models in turn, in this thread, each on its own stream
                    for k in running:
                        batch.take(k)
                        try:
                            results[k] = call(k)
                        except BaseException as e:
                            errors[k] = e
                        batch.finished(k)
                else:
                    _prune_module.select = _dispatching_select
                    try:
                        threads = [threading.Thread(target=work, args=(k,), name=f"stacked-pruner-{k}")
                                   for k in running]
                        for t in threads:
                            t.start()
                        for t in threads:
                            t.join()
                    finally:
                        _prune_module.select = _ORIGINAL_SELECT
            finally:
                if outer is not None:
                    torch.set_rng_state(outer)
        self.select_calls += batch.calls
        self._sync_grads(clear=True)
        self._clear_state_if_cleared([sentinel] * k_models)
        self._lrs_from_stand_ins()
        after = self._versions()
        if after != before:  # the stacked optimizer masking clears the state of newly pruned entries
            for _, layer in self.stacked.masked_layers():
                layer.bump_mask_versions()
        for k, e in enumerate(errors):
            if e is None:
                continue
            if not self.isolate_failures:
                raise RuntimeError(f"model {k}: its pruner raised {type(e).__name__}: {e}") from e
            self.failed[k] = e
            self.stop(k)
        return results

