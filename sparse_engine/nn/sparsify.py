"""Model-level conversion: ``sparsify``, ``densify`` and ``sparse_modules``.

Layers are converted in place by changing their class, so every ``Parameter`` object stays the
same: optimizers built before ``sparsify``, hooks, ``requires_grad``, dtypes and devices survive.
Which layers are supported and how each is converted: ``sparse_engine.nn.conversion``.

``include``/``exclude`` patterns are globs on the module names of ``model.named_modules()``
(``"encoder.*"``, ``"*self_attn"``, ``"lstm"``). A pattern that matches no module name is an
error, not a silent no-op: a typo would otherwise leave a model dense (or prune a layer meant to
be kept) without a word. What ``sparsify`` converted and what it left dense, with the reason, is
logged (logger ``sparse_engine.nn.sparsify``, level INFO) and printed by ``sparsity_report``.
"""
import fnmatch
import logging
import warnings
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

from sparse_engine.nn.conversion import SPARSE_TYPES, convert_module, sparse_class_for
from sparse_engine.nn.masked_module import MaskedModule, MaskedWeight, check_model, mask_buffer_name, sparse_modules
from sparse_engine.nn.report import SparsityReport, sparsity_report, weight_coverage
from sparse_engine.ops.masked_linear import check_backend

logger = logging.getLogger(__name__)

Selector = Union[None, str, Iterable[str], Callable[[str, nn.Module], bool]]


def _patterns(selector: Selector, argname: str) -> Optional[list[str]]:
    if selector is None or callable(selector):
        return None
    if isinstance(selector, str):
        return [selector]
    if isinstance(selector, (list, tuple, set, frozenset)) and all(isinstance(p, str) for p in selector):
        return list(selector)
    raise TypeError(f"{argname}: expected None, a name pattern, a list of name patterns or a callable "
                    f"(name, module) -> bool, got {selector!r}")


def name_matcher(selector: Selector, argname: str) -> Optional[Callable[[str, nn.Module], bool]]:
    """``(name, module) -> bool`` for a selector (None when it selects nothing in particular)."""
    patterns = _patterns(selector, argname)
    if patterns is None:
        return selector
    return lambda name, _: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def check_patterns_match(selector: Selector, argname: str, names: Iterable[str]) -> None:
    """Raise if a name pattern of ``selector`` matches none of ``names``."""
    patterns = _patterns(selector, argname)
    if not patterns:
        return
    names = list(names)
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        shown = [n for n in names if n][:8]
        raise ValueError(f"{argname}: pattern(s) {unmatched} match no name; names look like {shown}"
                         f"{' ...' if len(names) > 9 else ''}")


def _parent(modules: dict, name: str) -> tuple[Optional[nn.Module], str]:
    if not name:
        return None, ""
    parent_name, _, child = name.rpartition(".")
    return modules.get(parent_name), child


def _is_attention_out_proj(modules: dict, name: str) -> bool:
    parent, child = _parent(modules, name)
    return isinstance(parent, nn.MultiheadAttention) and child == "out_proj"


def _plan(model: nn.Module, modules: dict, inc, exc) -> list[str]:
    """Names of the modules to convert, in module order; raises (changing nothing) on a conflict."""
    errors, planned = [], set()
    for name, module in modules.items():
        if isinstance(module, MaskedModule) or (exc is not None and exc(name, module)):
            continue
        if _is_attention_out_proj(modules, name):
            parent_name = name.rpartition(".")[0]
            parent = modules[parent_name]
            if parent_name in planned or isinstance(parent, MaskedModule):
                planned.add(name)  # part of its attention layer's weights
            elif inc is not None and inc(name, module):
                errors.append(f"layer '{name}' matches include but is not supported on its own: its parent "
                              f"MultiheadAttention '{parent_name}' computes with its weight; convert '{parent_name}'")
            continue
        if inc is not None and not inc(name, module):
            continue
        cls, reason = sparse_class_for(type(module))
        if cls is not None:
            planned.add(name)
        elif inc is not None and any(p is not None for p in module._parameters.values()):
            # Only layers with Parameters are worth an error; include="*" also matches activations.
            errors.append(f"layer '{name}' of type {type(module).__name__} matches include but is not supported: "
                          f"{reason}")
    if errors:
        raise TypeError("sparsify: " + "; ".join(errors))

    # A Parameter shared by several layers is masked once: all of them must be sparse.
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for name, module in modules.items():
        for pname, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((name, module, pname))
    for name in planned:
        module = modules[name]
        for pname in sparse_class_for(type(module))[0].default_masked_weights(module):
            for other_name, other, other_pname in holders[id(getattr(module, pname))]:
                if other_name in planned or (isinstance(other, MaskedModule) and other_pname in other._masked_names):
                    continue
                errors.append(f"layer '{name}' shares its Parameter '{pname}' with '{other_name}.{other_pname}' "
                              f"({type(other).__name__}), which would stay dense and use the weight unmasked: "
                              f"convert both, or neither")
    if errors:
        raise ValueError("sparsify: " + "; ".join(errors))
    return [name for name in modules if name in planned]


def _mask_owners(modules: dict) -> dict[int, tuple[MaskedModule, str]]:
    owners = {}
    for module in modules.values():
        if isinstance(module, MaskedModule):
            for n in module.owned_masked_weights():
                owners.setdefault(id(getattr(module, n)), (module, n))
    return owners


def _fused_inference_guard(module, args) -> None:
    """Forward pre-hook on a ``TransformerEncoderLayer`` holding sparse layers: does nothing.

    Its presence keeps torch off the layer's fused inference path
    (``torch._transformer_encoder_layer_fwd``), which reads the raw weights and would skip the
    masks; torch takes the ordinary path when a submodule has hooks.
    """


def _guard_transformer_fast_paths(model: nn.Module, always: bool = False) -> None:
    """Keep torch's fused transformer paths off the encoder layers holding sparse layers (all of them with
    ``always``: a stacked model's layers, which hold stacked weights)."""
    for m in model.modules():
        if not always and not any(isinstance(s, MaskedModule) for s in m.modules()):
            continue
        if isinstance(m, nn.TransformerEncoderLayer) and _fused_inference_guard not in m._forward_pre_hooks.values():
            m.register_forward_pre_hook(_fused_inference_guard)
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False):
            # The nested-tensor path needs every layer on the fused path above.
            m.use_nested_tensor = False
            m._sparse_engine_nested = True


def _unguard_transformer_fast_paths(model: nn.Module) -> None:
    for m in model.modules():
        for key in [k for k, h in m._forward_pre_hooks.items() if h is _fused_inference_guard]:
            del m._forward_pre_hooks[key]
        if m.__dict__.pop("_sparse_engine_nested", False):
            m.use_nested_tensor = True


def sparsify(model: nn.Module, include: Selector = None, exclude: Selector = None,
             backend: str = "triton") -> nn.Module:
    """Turn the supported layers of ``model`` into sparse layers, in place.

    Supported: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, Embedding, Bilinear, LSTM, GRU, RNN,
    MultiheadAttention (in- and out-projections), and subclasses of these that do not override
    ``forward`` (``sparse_engine.nn.conversion``).

    Args:
        model: any module; a bare supported layer is converted itself.
        include: which layers to convert: None (every supported layer), glob patterns on the
            qualified module names (``"encoder.*"``), or a callable ``(name, module) -> bool``.
            An included layer with Parameters but of an unsupported type is an error.
        exclude: layers to leave dense, same forms as ``include``. A name pattern (of ``include``
            or ``exclude``) that matches no module name is an error.
        backend: CUDA kernel of the matmul layers, ``"triton"`` or ``"cuda"``.
    Returns:
        ``model``, whose converted layers start with dense masks (nothing is pruned). The
        converted and the left-dense weights, with reasons, are logged at INFO and shown by
        ``sparsity_report(model)``.

    Layers sharing one Parameter (tied weights) share one mask; all of them must be converted
    (an error otherwise). Nothing is changed when ``sparsify`` raises.
    """
    check_model(model)
    check_backend(backend)
    inc, exc = name_matcher(include, "include"), name_matcher(exclude, "exclude")
    modules = dict(model.named_modules())
    check_patterns_match(include, "include", modules)
    check_patterns_match(exclude, "exclude", modules)
    plan = _plan(model, modules, inc, exc)
    owners = _mask_owners(modules)
    for name in plan:
        module = modules[name]
        names = sparse_class_for(type(module))[0].default_masked_weights(module)
        tied = {n: owners[id(getattr(module, n))] for n in names if id(getattr(module, n)) in owners}
        convert_module(module, backend, tied=tied, called_by_parent=_is_attention_out_proj(modules, name))
        for n in names:
            owners.setdefault(id(getattr(module, n)), (module, n))
    _guard_transformer_fast_paths(model)
    logger.debug("sparsify: converted %s", plan)
    if logger.isEnabledFor(logging.INFO):
        logger.info("sparsify: converted %d layer(s); %s", len(plan), weight_coverage(model))
    return model


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Turn sparse layers back into their torch layers, in place.

    Pruned weights stay exact zeros; the masks are dropped.
    """
    check_model(model)
    layers = [m for m in model.modules() if isinstance(m, MaskedModule)]
    for module in layers:
        module.apply_mask_()
    for module in layers:
        for n in module.owned_masked_weights():
            del module._buffers[mask_buffer_name(n)]
        for attr in ("backend", "_masked_names", "_mask_owners", "_mask_versions", "_weight_overrides", "input_kind",
                     "_mask_loaded_at"):
            module.__dict__.pop(attr, None)
        module.__class__ = module.dense_type
    _unguard_transformer_fast_paths(model)
    return model


def exclude_units(units: list, exclude: Selector, argname: str = "exclude") -> list:
    """The ``(name, unit)`` pairs of ``units`` that ``exclude`` does not match.

    A ``MaskedWeight`` unit (``"lstm.weight_ih_l0"``) is matched by its own name or by its
    layer's (``"lstm"``). A name pattern that matches no unit or layer name is an error.
    """
    matcher = name_matcher(exclude, argname)
    if matcher is None:
        return list(units)
    aliases = [(n, u, [n, n.rpartition(".")[0]] if isinstance(u, MaskedWeight) else [n]) for n, u in units]
    check_patterns_match(exclude, argname, [a for _, _, names in aliases for a in names])
    return [(n, u) for n, u, names in aliases if not any(matcher(a, u) for a in names)]


def check_materialized(layers) -> None:
    """Raise for sparse layers on the meta device (no values to prune or report)."""
    meta = [name for name, unit in layers if unit.weight.is_meta]
    if meta:
        raise ValueError(f"model: layer(s) {meta} are on the meta device (no values); load the weights first, "
                         f"e.g. model.load_state_dict(state_dict, assign=True)")


PRUNE_ADVICE = ("keep a minimum per layer with min_density= (e.g. prune_(..., min_density=0.02)), or use a per-layer "
                "allocation such as 'erk' or 'uniform'")


def warn_empty_layers(report: SparsityReport, names, caller: str, advice: str = PRUNE_ADVICE) -> None:
    """Warn about the layers among ``names`` that keep no weight (pruned to density 0); ``advice``
    says how the caller's user keeps some."""
    names = set(names)
    empty = [n for n in report.empty_layers() if n in names]
    if empty:
        warnings.warn(f"{caller}: layer(s) {empty} are pruned to density 0 (every output they compute is the bias, or "
                      f"zero); {advice}", stacklevel=3)


# Re-exported here, where they lived before nn/report.py.
__all__ = ["sparsify", "densify", "sparse_modules", "name_matcher", "check_patterns_match", "Selector",
           "SPARSE_TYPES", "SparsityReport", "sparsity_report", "check_materialized", "warn_empty_layers",
           "exclude_units"]
