"""Pruning scores: how important each weight of each sparse layer is.

Every score function returns ``{layer name: float32 tensor of the weight's shape}`` for the
sparse layers of a model (all of them, or those named by ``names``), and every score points the
same way: **larger is more important**, so a mask keeps the largest scores.

Data-driven scores (gradient, saliency, GraSP) run the sparse layers through their *dense*
forward (``F.linear``/``conv`` on the weight itself). Pruned weights are exact zeros, so the
outputs are the model's, but the gradients are dense: a pruned weight gets the gradient it would
have if it were regrown (what RigL-style regrowth needs), and second derivatives exist for GraSP.
They run the model in its current train/eval mode and restore every buffer afterwards (BatchNorm
running statistics are unchanged), and never touch ``.grad``.

``data`` for gradient-based scores: one batch ``(inputs, targets)`` or an iterable of such
batches (a list, a ``DataLoader``); the loss of a batch is ``loss_fn(model(inputs), targets)`` and
gradients are averaged over batches. ``calib_data`` for Wanda: a tensor (one batch of inputs) or
an iterable of batches, each a tensor or a tuple whose first element is the inputs.
"""
import math
import numbers
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule, require_input_kind
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparsify import sparse_modules
from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask
from sparse_engine.pruning.select.checks import check_length

Scores = dict[str, Tensor]


def _named_layers(model: nn.Module, names: Optional[Sequence[str]] = None) -> list[tuple[str, MaskedModule]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers = sparse_modules(model)
    if not layers:
        raise ValueError("model: expected a model with sparse layers (call sparse_engine.sparsify first), found none")
    if names is None:
        return layers
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise TypeError(f"names: expected None or a list of sparse layer names, got {names!r}")
    by_name = dict(layers)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"names: unknown sparse layer(s) {unknown}; the sparse layers are {list(by_name)}")
    return [(n, by_name[n]) for n in names]


@contextmanager
def forward_with(layers: Sequence[MaskedModule], weights: Sequence[Tensor]) -> Iterator[None]:
    """Within the block, each sparse layer computes its dense forward (``F.linear``/conv/...) with
    the given weight tensor instead of its masked forward (``layer.use_weight``)."""
    layers, weights = list(layers), list(weights)
    if len(weights) != len(layers):
        raise ValueError(f"weights: expected one tensor per layer ({len(layers)}), got {len(weights)}")
    with ExitStack() as stack:
        for m, w in zip(layers, weights):
            stack.enter_context(m.use_weight(w))
        yield


@contextmanager
def _dense_forward(layers: Sequence[MaskedModule]) -> Iterator[list[Tensor]]:
    """Sparse layers compute with their dense forward on leaf tensors that share the weights'
    storage; yields those leaves (differentiate with respect to them)."""
    leaves = [m.weight.detach().requires_grad_(True) for m in layers]
    with forward_with(layers, leaves):
        yield leaves


@contextmanager
def buffers_restored(model: nn.Module) -> Iterator[None]:
    """Within the block the model may change its buffers (BatchNorm statistics); they are restored after."""
    saved = [(b, b.clone()) for name, b in model.named_buffers() if not name.endswith("mask_bits")]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


def _batches(data, argname: str = "data") -> list[tuple]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor):
        return [tuple(data)]
    if isinstance(data, Tensor) or not isinstance(data, Iterable):
        raise TypeError(f"{argname}: expected a batch (inputs, targets) or an iterable of such batches, "
                        f"got {type(data).__name__}")
    batches = []
    for i, batch in enumerate(data):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(f"{argname}: batch {i}: expected a pair (inputs, targets), got {type(batch).__name__}")
        batches.append(tuple(batch))
    if not batches:
        raise ValueError(f"{argname}: expected at least one batch, got none")
    return batches


def calib_inputs(calib_data) -> Iterator[Tensor]:
    """The input tensors of calibration data: a tensor, or an iterable of tensors or (inputs, ...) batches."""
    if isinstance(calib_data, Tensor):
        yield calib_data
        return
    if not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data: expected a tensor or an iterable of batches, got {type(calib_data).__name__}")
    for batch in calib_data:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


def _mean_grads(model: nn.Module, leaves: Sequence[Tensor], loss_fn: Callable, batches: Sequence[tuple],
                temperature: float = 1.0) -> list[Tensor]:
    grads = [torch.zeros_like(w) for w in leaves]
    for x, y in batches:
        with torch.enable_grad():
            out = model(x)
            loss = loss_fn(out / temperature if temperature != 1.0 else out, y)
            gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        for acc, g in zip(grads, gs):
            if g is not None:
                acc += g
    return [g / len(batches) for g in grads]


def _data_grads(model: nn.Module, layers, loss_fn, data, score: str) -> list[Tensor]:
    """Dense gradients from ``loss_fn`` and ``data``, or the weights' ``.grad`` if neither is given."""
    if loss_fn is None and data is None:
        grads = []
        for name, m in layers:
            if m.weight.grad is None:
                raise ValueError(f"score '{score}' needs loss_fn and data (or .grad on every weight: layer '{name}' "
                                 f"has none)")
            grads.append(m.weight.grad.detach())
        return grads
    if loss_fn is None or data is None:
        raise ValueError(f"score '{score}' needs both loss_fn and data (got only "
                         f"{'data' if loss_fn is None else 'loss_fn'})")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    batches = _batches(data)
    mods = [m for _, m in layers]
    with buffers_restored(model), _dense_forward(mods) as leaves:
        return _mean_grads(model, leaves, loss_fn, batches)


def magnitude_scores(model: nn.Module, names: Optional[Sequence[str]] = None) -> Scores:
    """``|w|``."""
    return {n: m.weight.detach().abs().float() for n, m in _named_layers(model, names)}


def gradient_scores(model: nn.Module, loss_fn: Optional[Callable] = None, data=None,
                    names: Optional[Sequence[str]] = None) -> Scores:
    """``|g|``: the dense loss gradient from ``loss_fn`` and ``data`` (module docstring), or each
    weight's ``.grad`` when neither is given (a sparse layer's ``.grad`` is zero where pruned)."""
    layers = _named_layers(model, names)
    grads = _data_grads(model, layers, loss_fn, data, "gradient")
    return {n: g.abs().float() for (n, _), g in zip(layers, grads)}


def saliency_scores(model: nn.Module, loss_fn: Optional[Callable] = None, data=None,
                    names: Optional[Sequence[str]] = None) -> Scores:
    """SNIP's connection sensitivity ``|w * g|`` (Lee, Ajanthan and Torr 2019); ``g`` as in
    :func:`gradient_scores`. The paper's normalisation by the sum does not change the ranking."""
    layers = _named_layers(model, names)
    grads = _data_grads(model, layers, loss_fn, data, "saliency")
    return {n: (m.weight.detach() * g).abs().float() for (n, m), g in zip(layers, grads)}


def grasp_scores(model: nn.Module, loss_fn: Callable, data, names: Optional[Sequence[str]] = None,
                 temperature: float = 1.0) -> Scores:
    """GraSP (Wang, Zhang and Grosse 2020): ``w * (H g)``, larger is more important.

    The paper scores ``S = -w * (H g)`` and removes the weights with the *highest* ``S`` (those
    whose removal reduces the gradient flow least, or increases it); this function returns
    ``-S = w * (H g)`` so that keeping the largest scores is GraSP's rule. ``g`` is the gradient
    averaged over ``data`` (no graph), ``H g`` the Hessian-vector product
    ``d(g_batch . g) / dw`` with ``create_graph``, averaged over the batches; both over the
    weights of the scored layers. ``temperature`` divides the outputs before the loss (the
    authors' code uses 200 on CIFAR; 1 is the plain loss).
    """
    if loss_fn is None or data is None:
        raise ValueError("score 'grasp' needs loss_fn and data")
    if isinstance(temperature, (bool, Tensor)) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0 (it divides the outputs), got {temperature!r}")
    layers = _named_layers(model, names)
    batches = _batches(data)
    with buffers_restored(model), _dense_forward([m for _, m in layers]) as leaves:
        g = _mean_grads(model, leaves, loss_fn, batches, temperature)
        hg = [torch.zeros_like(w) for w in leaves]
        for x, y in batches:
            with torch.enable_grad():
                loss = loss_fn(model(x) / temperature, y)
                gs = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                z = sum((gi * g0).sum() for gi, g0 in zip(gs, g) if gi is not None)
                if not isinstance(z, Tensor) or not z.requires_grad:
                    continue  # the loss is linear in the weights: H g = 0
                hgs = torch.autograd.grad(z, leaves, allow_unused=True)
            for acc, h in zip(hg, hgs):
                if h is not None:
                    acc += h.detach()
    return {n: (m.weight.detach() * h / len(batches)).float() for (n, m), h in zip(layers, hg)}


def synflow_scores(model: nn.Module, input_shape: Sequence[int], names: Optional[Sequence[str]] = None) -> Scores:
    """SynFlow (Tanaka et al. 2020), data-free: ``|w * dR/dw|`` with ``R = sum(model(ones))``.

    The model is linearised as in the authors' code: every floating parameter and buffer is
    replaced by its absolute value, the model runs in eval mode (BatchNorm uses its running
    statistics, which are linearised too) on an all-ones input of shape ``input_shape`` (batch
    dimension included, e.g. ``(1, 3, 32, 32)``), in the parameters' dtype. Signs, values and
    train/eval modes are restored exactly afterwards. Pruned weights are zero, so they score 0.
    The iterative schedule is ``prune_(..., score="synflow", iterations=...)``. Deep models can
    overflow in float16/float32 (R is a product over layers); prune a float64 copy then.
    """
    if input_shape is None:
        raise ValueError("score 'synflow' needs input_shape (the shape of the all-ones input, batch dimension "
                         "included)")
    if isinstance(input_shape, (str, bytes, Tensor)) or not isinstance(input_shape, Sequence) or not input_shape \
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in input_shape):
        raise ValueError(f"input_shape: expected a non-empty sequence of ints >= 1 (the all-ones input's shape, batch "
                         f"dimension included), got {input_shape!r}")
    input_shape = tuple(int(s) for s in input_shape)
    layers = _named_layers(model, names)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()}
    negative = {k: torch.signbit(t) for k, t in tensors.items()}
    modes = [(m, m.training) for m in model.modules()]
    first = next(iter(tensors.values()))
    model.eval()
    try:
        with torch.no_grad():
            for t in tensors.values():
                t.abs_()
        with _dense_forward([m for _, m in layers]) as leaves, torch.enable_grad():
            out = model(torch.ones(input_shape, dtype=first.dtype, device=first.device))
            if not isinstance(out, Tensor):
                raise TypeError(f"synflow: expected the model to return a tensor, got {type(out).__name__}")
            grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
        scores = {n: (torch.zeros_like(w) if g is None else (w * g).abs()).float()
                  for (n, _), w, g in zip(layers, leaves, grads)}
    finally:
        with torch.no_grad():
            for k, t in tensors.items():
                t.copy_(torch.where(negative[k], -t, t))
        for m, training in modes:
            m.training = training
    return scores


def _wanda_hook(sums: dict, module, args) -> None:
    x = args[0].detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if isinstance(module, SparseConv2d):
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        x = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        sq = x.square().sum((0, 2))  # one entry per (c, kh, kw), channel-major like the weight's columns
    else:
        sq = x.reshape(-1, x.shape[-1]).square().sum(0)
    key = id(module)
    sums[key] = sums[key] + sq.double() if key in sums else sq.double()


def wanda_scores(model: nn.Module, calib_data, names: Optional[Sequence[str]] = None) -> Scores:
    """Wanda (Sun et al. 2024): ``|w_ij| * ||x_j||_2`` over calibration inputs.

    Forward pre-hooks sum the squares of each layer's input per input feature ``j`` over every
    calibration token: for ``Linear`` over all leading dimensions; for ``Conv2d`` over the batch
    and output positions of the *unfolded* input (after the layer's padding), so ``j`` runs over
    the weight's columns ``(ci, kh, kw)`` and border positions see the zero padding, exactly as
    the convolution multiplies them. With ``groups > 1`` each output channel uses its group's
    input channels. The model runs under ``no_grad`` in its current mode; buffers are restored.
    (The paper compares weights per output row; ``allocation="uniform"`` compares per layer.)
    """
    if calib_data is None:
        raise ValueError("score 'wanda' needs calib_data")
    layers = _named_layers(model, names)
    for name, m in layers:
        require_input_kind(name, m, "score 'wanda'")
    sums: dict = {}
    handles = [m.register_forward_pre_hook(partial(_wanda_hook, sums)) for _, m in layers]
    try:
        with torch.no_grad(), buffers_restored(model):
            for x in calib_inputs(calib_data):
                model(x)
    finally:
        for h in handles:
            h.remove()
    scores = {}
    for name, m in layers:
        if id(m) not in sums:
            raise ValueError(f"calib_data: layer '{name}' received no input during calibration")
        norms = sums[id(m)].sqrt()
        w = m.weight.detach()
        rows, cols = selection_shape(w.shape)
        groups = getattr(m, "groups", 1)
        per_row = norms.view(groups, cols).repeat_interleave(rows // groups, 0)
        scores[name] = (w.reshape(rows, cols).abs() * per_row.to(w.dtype)).reshape(w.shape).float()
    return scores


def lamp_transform(values: Tensor) -> Tensor:
    """LAMP scores of one layer's ``values`` (Lee et al. 2021): with the squares ``v^2`` sorted
    ascending (ties in flat-index order), ``score(u) = v_u^2 / sum_{v >= u} v^2``; 0 where that
    sum is 0. Float32, the shape of ``values``. Computed in float64. NaN or infinite values are an
    error (an infinite square would make every ratio NaN)."""
    if not isinstance(values, Tensor):
        raise TypeError(f"values: expected a torch.Tensor, got {type(values).__name__}")
    sq = values.detach().reshape(-1).double().square()
    if not torch.isfinite(sq).all():
        raise ValueError("values: contains NaN or inf; LAMP scores need finite values")
    order = torch.sort(sq, stable=True).indices
    ranked = sq[order]
    tail = ranked.flip(0).cumsum(0).flip(0)
    lamp = torch.where(tail > 0, ranked / torch.where(tail > 0, tail, 1.0), 0.0)
    out = torch.empty_like(lamp)
    out[order] = lamp
    return out.float().reshape(values.shape)


def lamp_scores(model: nn.Module, names: Optional[Sequence[str]] = None) -> Scores:
    """LAMP (layer-adaptive magnitude-based pruning) scores of each weight, per layer: see
    :func:`lamp_transform`. A global selection on them gives LAMP's layer-wise allocation."""
    return {n: lamp_transform(m.weight) for n, m in _named_layers(model, names)}


def random_scores(model: nn.Module, generator: Optional[torch.Generator] = None,
                  names: Optional[Sequence[str]] = None) -> Scores:
    """Uniform random scores in [0, 1) drawn from ``generator`` (default: torch's global RNG),
    layer by layer in module order, on the generator's device."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    device = generator.device if generator is not None else torch.device("cpu")
    return {n: torch.rand(m.weight.shape, generator=generator, device=device).to(m.weight.device)
            for n, m in _named_layers(model, names)}


def custom_scores(model: nn.Module, scores: Mapping[str, Tensor], names: Optional[Sequence[str]] = None) -> Scores:
    """Validate user scores: one floating tensor of the weight's shape for every layer of
    ``names`` (default all sparse layers), no NaN, no unknown names. Returns float32 copies."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"score: expected a score name or a dict {{layer name: tensor}}, got {type(scores).__name__}")
    layers = _named_layers(model, names)
    known = {n for n, _ in sparse_modules(model)}
    unknown = sorted(set(scores) - known)
    if unknown:
        raise ValueError(f"score: unknown layer name(s) {unknown}; the sparse layers are {sorted(known)}")
    missing = [n for n, _ in layers if n not in scores]
    if missing:
        raise ValueError(f"score: missing scores for layer(s) {missing}")
    out = {}
    for name, m in layers:
        s = scores[name]
        if not isinstance(s, Tensor) or not s.is_floating_point():
            raise TypeError(f"score['{name}']: expected a floating-point tensor, got "
                            f"{getattr(s, 'dtype', type(s).__name__)}")
        if s.shape != m.weight.shape:
            raise ValueError(f"score['{name}']: expected shape {tuple(m.weight.shape)} (the weight's), "
                             f"got {tuple(s.shape)}")
        if torch.isnan(s).any():
            raise ValueError(f"score['{name}']: contains NaN; NaN scores cannot be ranked")
        out[name] = s.detach().to(device=m.weight.device, dtype=torch.float32, copy=True)
    return out


def fggp_keep_scores(weights: Sequence[Tensor], grads: Sequence[Tensor], kept: Sequence[Tensor],
                     ks: Sequence[int], group: Sequence[int], rate: float) -> list[Tensor]:
    """FGGP's gradient-first, magnitude-next rule (Zhu, Bezek and Goksel 2024, "FGGP: Fixed-Rate
    Gradient-First Gradual Pruning") as keep-scores for ``topk_mask``.

    In each group ``g`` (a layer, or all layers for a global allocation) that keeps ``c_g`` weights
    now and must keep ``ks[g]``, ``p_g = c_g - ks[g]`` weights are pruned:

    1. candidates: the ``min(c_g, round(rate * p_g))`` kept weights with the lowest ``|grad|``
       (``topk_mask(largest=False)``; pruned weights score ``+inf`` so they are never candidates);
    2. the ``p_g`` candidates with the lowest ``|w|`` are pruned.

    Returned keep-scores: ``|w|`` for candidates, ``+inf`` for the other kept weights, ``-inf``
    for pruned ones, so keeping the ``ks[g]`` largest (``topk_mask``) applies step 2 and keeps
    every non-candidate. ``rate >= 1`` (a fixed rate, the paper's point, rather than an annealed
    one). All tensors share each layer's shape; ``kept`` is bool.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate >= 1.0 or math.isinf(rate):
        raise ValueError(f"rate: expected a finite number >= 1 (candidates per weight to prune), got {rate!r}")
    weights = list(weights)
    grads, kept, group = (check_length(v, len(weights), name, "weight")
                          for v, name in ((grads, "grads"), (kept, "kept"), (group, "group")))
    ks = list(ks)
    if any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or not 0 <= g < len(ks) for g in group):
        raise ValueError(f"group: expected ints in [0, {len(ks)}) (one k per group), got {group}")
    kept_counts = [0] * len(ks)
    for k, g in zip(kept, group):
        kept_counts[g] += int(k.sum())
    candidates = []
    for g, (c, k) in enumerate(zip(kept_counts, ks)):
        if k > c:
            raise ValueError(f"fggp: group {g} keeps {c} weights, fewer than the {k} asked for; fggp only prunes")
        candidates.append(min(c, round(rate * (c - k))))
    top = torch.finfo(torch.float32).max
    grad_scores = [torch.where(k, g.detach().abs().float().clamp_max(top), torch.inf) for g, k in zip(grads, kept)]
    bits = topk_mask(grad_scores, candidates, largest=False, group=list(group))
    out = []
    for b, w, k in zip(bits, weights, kept):
        cand = unpack_mask(b, selection_shape(w.shape)).reshape(w.shape)
        score = torch.where(cand, w.detach().abs().float().clamp_max(top), torch.inf)
        out.append(torch.where(k, score, -torch.inf))
    return out


SCORE_FUNCTIONS = {
    "magnitude": magnitude_scores,
    "gradient": gradient_scores,
    "saliency": saliency_scores,
    "grasp": grasp_scores,
    "synflow": synflow_scores,
    "wanda": wanda_scores,
    "lamp": lamp_scores,
    "random": random_scores,
}
SCORES = tuple(SCORE_FUNCTIONS) + ("fggp",)
