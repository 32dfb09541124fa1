"""Layer-wise Optimal Brain Surgeon pruning: SparseGPT (Frantar & Alistarh 2023).

Each sparse layer ``W`` (rows x cols, a convolution viewed as ``(Co, Ci/groups*kH*kW)`` like its
mask) is pruned against the quadratic model of its output error on calibration inputs ``X``::

    || (W - W') X ||^2 / n  =  1/2 tr((W - W') H (W - W')^T),   H = 2/n X^T X   (cols x cols)

``obs_layerwise`` accumulates ``H`` with a forward pre-hook, streaming over the calibration
batches (one ``cols x cols`` sum a layer, never the activations), prunes the layer, writes the
updated weights and mask, and moves on to the next layer (module order), whose inputs then come
from the already pruned layers, as SparseGPT does.

The per-layer algorithm (``obs_prune_weight``), SparseGPT's ``fasterprune``:

1. Dead inputs (``H_ii = 0``) get ``H_ii = 1`` and ``W[:, i] = 0``; ``damp * mean(diag H)`` is
   added to the diagonal.
2. ``U``: the upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``). Row ``i`` of ``U`` holds the
   inverse Hessian of the columns ``i..cols`` once the columns before ``i`` are fixed, so a
   column can be pruned and its error spread over the later columns only.
3. Columns in blocks of ``block_size``. For each column ``i`` of a block, in order: ``q`` is the
   column with its pruned entries set to 0, ``err = (w - q) / U_ii``, and the later columns of the
   block move by ``-err U[i, i+1:]`` (the OBS update); after the block, every later column moves
   by ``-Err U[block, rest]`` at once (the lazy batch update, one matmul).

Masks, with ``d = diag(U)`` and scores ``w^2 / d^2`` (the OBS saliency given the earlier columns)
ranked in float32 like every selection of the library (``topk_mask``'s tie rule: the earlier
element of the row-major weight wins):

* unstructured: at the start of each block the ``rows x block`` scores are ranked together (as
  SparseGPT does, one threshold for the whole block, not per row). SparseGPT prunes
  ``int(sparsity * numel_block) + 1`` weights a block; here the layer prunes exactly
  ``P = round(sparsity * numel)`` weights (``torch.nn.utils.prune``'s rounding, as ``prune_``),
  spread over the blocks in proportion to their columns: the blocks up to column ``c`` prune
  ``round_half_up(P * c / cols)`` in total, so block ``b`` prunes the difference and keeps the
  rest through ``topk_mask``.
* ``N:M`` (``N`` kept of every ``M`` consecutive columns, ``sparse_engine.pruning.select.granularity``):
  when the sweep reaches the first column of a group, each row keeps the ``N`` best scores of
  the group's ``M`` (current, already updated) columns through ``nm_mask``. ``block_size`` must
  be a multiple of ``M`` so that no group straddles two blocks.

The fast path differs from the straightforward loop (``obs_prune_weight_ref``) only in how the
same arithmetic is arranged: one Cholesky of the flipped ``H`` and a triangular inverse give
``U`` (``chol(J H J) = J V J`` with ``H = V V^T``, ``V`` upper, so ``U = V^-1``) instead of
Cholesky, ``cholesky_inverse`` and a second Cholesky (which can fail in float32 on a
well-factorised ``H``); the weights are swept transposed so a column is contiguous; the error of
a column is one multiply by a precomputed ``pruned / d`` row; and the in-block update is itself
lazy over sub-blocks of ``_SUB_BLOCK`` columns (rank-1 updates within a sub-block, one matmul
for the rest of the block), which keeps the memory-bound rank-1 work small.

Convolutions: the hook unfolds the input (after the layer's padding) into the weight's
``(ci, kh, kw)`` columns, one row per output position, as ``wanda_scores`` does. A grouped
convolution gets one Hessian per group (``(groups, cols, cols)``), each group's rows are pruned
against its own, and the layer's exact count is spread over the groups by the same rule as
over blocks.
"""
import math
from collections.abc import Iterable, Iterator
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sparse_engine.nn.masked_module import MaskedModule, require_input_kind
from sparse_engine.nn.sparse_conv2d import SparseConv2d
from sparse_engine.nn.sparsify import Selector, SparsityReport, sparsity_report
from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import selection_shape, topk_mask
from sparse_engine.pruning.select import (Granularity, buffers_restored, calib_inputs, nm_mask, parse_granularity,
                                          prunable_layers, restores_on_error, target_kept)

NMPattern = Union[None, str, tuple[int, int]]
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Columns updated by rank-1 steps before one matmul updates the rest of the block.
_SUB_BLOCK = 16
# H counts as symmetric when max |H - H^T| <= this * max |H| (X^T X from a blocked GEMM is not
# bitwise symmetric); it is then symmetrised.
_SYMMETRY_RTOL = 1e-4


# ----------------------------------------------------------------------------------------------
# Checks shared by the fast path and the reference

def _check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: expected a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_options(block_size, damp) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: expected an int >= 1, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not math.isfinite(damp) or damp < 0:
        raise ValueError(f"damp: expected a finite number >= 0 (a fraction of mean(diag H)), got {damp!r}")


def _parse_nm(nm: NMPattern, sparsity: float, block_size: int) -> Optional[tuple[int, int]]:
    if nm is None:
        return None
    if isinstance(nm, str):
        gran = parse_granularity(nm)
        if gran.kind != "nm":
            raise ValueError(f"nm: expected None, an 'N:M' string or a pair (N, M), got {nm!r}")
        n, m = gran.n, gran.m
    elif (isinstance(nm, (tuple, list)) and len(nm) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in nm)):
        n, m = nm
        if not 1 <= n <= m:
            raise ValueError(f"nm: N:M needs 1 <= N <= M, got {tuple(nm)}")
    else:
        raise ValueError(f"nm: expected None, an 'N:M' string or a pair (N, M), got {nm!r}")
    if not math.isclose(sparsity, 1 - n / m, abs_tol=1e-9):
        raise ValueError(f"N:M {n}:{m} keeps {n} of every {m} weights (sparsity {1 - n / m:g}); "
                         f"got sparsity={sparsity}")
    if block_size % m:
        raise ValueError(f"block_size: expected a multiple of M={m} with N:M {n}:{m} (a group of M columns "
                         f"must not straddle two blocks), got {block_size}")
    return n, m


def _check_problem(W, H, sparsity, block_size, damp, nm):
    """Validated ``(W2, H, nm, n_prune, dtype)``: ``W2`` the ``(rows, cols)`` view of ``W`` and
    ``H`` in the working dtype (float64 if either is float64, else float32), ``H`` symmetrised."""
    sparsity = _check_sparsity(sparsity)
    _check_options(block_size, damp)
    if not isinstance(W, Tensor) or W.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"W: expected a floating-point torch.Tensor, got {getattr(W, 'dtype', type(W).__name__)}")
    if W.dim() < 2:
        raise ValueError(f"W: expected rank >= 2 (rows, cols...), got shape {tuple(W.shape)}")
    rows, cols = selection_shape(W.shape)
    if not isinstance(H, Tensor) or H.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"H: expected a floating-point torch.Tensor, got {getattr(H, 'dtype', type(H).__name__)}")
    if tuple(H.shape) != (cols, cols):
        raise ValueError(f"H: expected shape ({cols}, {cols}) for W of shape {tuple(W.shape)} viewed as "
                         f"({rows}, {cols}), got {tuple(H.shape)}")
    if H.device != W.device:
        raise ValueError(f"H: expected a tensor on {W.device} (W's device), got {H.device}")
    nm = _parse_nm(nm, sparsity, block_size)
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M {nm[0]}:{nm[1]}: W has {cols} columns (shape {tuple(W.shape)}), not a multiple "
                         f"of M={nm[1]}")
    dtype = torch.float64 if torch.float64 in (W.dtype, H.dtype) else torch.float32
    W2 = W.detach().reshape(rows, cols).to(dtype)
    if not torch.isfinite(W2).all():
        raise ValueError("W: contains NaN or inf")
    H = _check_hessian(H.detach().to(dtype), "H")
    return W2, H, nm, W.numel() - target_kept(W.numel(), sparsity), dtype


def _check_hessian(H: Tensor, what: str) -> Tensor:
    if not torch.isfinite(H).all():
        raise ValueError(f"{what}: contains NaN or inf")
    scale = H.abs().max()
    if (H - H.mT).abs().max() > _SYMMETRY_RTOL * scale:
        raise ValueError(f"{what}: expected a symmetric matrix (a Hessian X^T X), got max |H - H^T| = "
                         f"{(H - H.mT).abs().max().item():.3g} for max |H| = {scale.item():.3g}")
    diag = H.diagonal(dim1=-2, dim2=-1)
    if (diag < 0).any():
        i = int(torch.nonzero(diag < 0)[0, -1])
        raise ValueError(f"{what}: expected a positive semi-definite Hessian, but diagonal entry {i} is "
                         f"{diag.reshape(-1, diag.shape[-1])[:, i].min().item():.3g} < 0")
    return (H + H.mT) / 2


def _block_pruned_counts(n_prune: int, cols: int, block_size: int) -> list[int]:
    """Pruned count of each block: the blocks up to column ``c`` prune ``round_half_up(n_prune * c
    / cols)`` in total (integer arithmetic), so the counts sum to ``n_prune`` exactly and a block
    of ``c_b`` columns (``rows * c_b`` weights) prunes at most ``rows * c_b``."""
    def prefix(c: int) -> int:
        return (2 * n_prune * c + cols) // (2 * cols)
    return [prefix(min(i + block_size, cols)) - prefix(i) for i in range(0, cols, block_size)]


def _dead_inputs(W2: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """SparseGPT's dead-input rule on copies: ``H_ii = 0`` -> ``H_ii = 1``, ``W[:, i] = 0``."""
    W2, H = W2.clone(), H.clone()
    dead = H.diagonal() == 0
    H.diagonal()[dead] = 1
    W2[:, dead] = 0
    return W2, H


def _damped(H: Tensor, damp: float) -> Tensor:
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    return H


def _not_positive_definite(column: int, damp: float) -> ValueError:
    return ValueError(f"H: not positive definite after damping (damp={damp} adds damp * mean(diag H) to the "
                      f"diagonal; the factorisation fails at column {column}): the Hessian is singular or "
                      f"indefinite; pass a larger damp, or check the Hessian")


# ----------------------------------------------------------------------------------------------
# Fast path

def _inverse_cholesky_upper(H: Tensor, damp: float) -> Tensor:
    """Upper ``U`` with ``U^T U = (H + damp * mean(diag H) I)^-1``, from one Cholesky of the
    flipped matrix and one triangular inverse (see the module docstring)."""
    cols = H.shape[0]
    L, info = torch.linalg.cholesky_ex(_damped(H, damp).flip(0, 1))
    if info.item() > 0:
        # The leading minor of order info of the flipped matrix is the trailing one of H.
        raise _not_positive_definite(cols - int(info.item()), damp)
    V = L.flip(0, 1)  # upper, H = V V^T
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    return torch.linalg.solve_triangular(V, eye, upper=True)


def _keep_largest(scores: Tensor, k: int) -> Tensor:
    """Bool mask of ``scores``' shape (rows, c) keeping its ``k`` largest (topk_mask's rule)."""
    bits = topk_mask(scores.float(), k)[0]
    return unpack_mask(bits, scores.shape)


def _obs_sweep(W2: Tensor, H: Tensor, damp: float, block_size: int, counts: Optional[list[int]],
               nm: Optional[tuple[int, int]]) -> tuple[Tensor, Tensor]:
    """SparseGPT's sweep on ``W2`` (rows, cols) and ``H`` (cols, cols), both in the working dtype
    and already checked: ``counts`` pruned per block (unstructured) or ``nm``. Returns the new
    ``(rows, cols)`` weights and the bool keep mask."""
    W2, H = _dead_inputs(W2, H)
    rows, cols = W2.shape
    U = _inverse_cholesky_upper(H, damp)
    WT = W2.t().contiguous()  # (cols, rows): a column of W is a contiguous row here
    keepT = torch.ones(cols, rows, dtype=torch.bool, device=W2.device)
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        c = i2 - i1
        B = WT[i1:i2]
        Ub = U[i1:i2, i1:i2]
        d = Ub.diagonal()
        kb = keepT[i1:i2]
        if nm is None:
            scores = (B.square() / d.square()[:, None]).t()
            kb.copy_(_keep_largest(scores, rows * c - counts[b]).t())
            gain = (~kb).to(W2.dtype) / d[:, None]  # err of column i = w_i * gain_i
        else:
            gain = torch.empty_like(B)
        E = torch.empty_like(B)
        sub = _SUB_BLOCK if nm is None else nm[1] * max(1, _SUB_BLOCK // nm[1])
        for j1 in range(0, c, sub):
            j2 = min(j1 + sub, c)
            for i in range(j1, j2):
                if nm is not None and i % nm[1] == 0:
                    g = slice(i, i + nm[1])
                    scores = (B[g].square() / d[g].square()[:, None]).t()
                    keep = nm_mask(scores, nm[0], nm[1]).t()
                    kb[g] = keep
                    torch.div((~keep).to(W2.dtype), d[g, None], out=gain[g])
                torch.mul(B[i], gain[i], out=E[i])
                if i + 1 < j2:
                    B[i + 1:j2].addr_(Ub[i, i + 1:j2], E[i], alpha=-1)
            if j2 < c:
                B[j2:].addmm_(Ub[j1:j2, j2:].t(), E[j1:j2], alpha=-1)
        B.mul_(kb)
        if i2 < cols:
            WT[i2:].addmm_(U[i1:i2, i2:].t(), E, alpha=-1)
    return WT.t(), keepT.t()


def _obs_prune_2d(W2: Tensor, H: Tensor, n_prune: int, nm: Optional[tuple[int, int]], block_size: int,
                  damp: float) -> tuple[Tensor, Tensor]:
    counts = None if nm is not None else _block_pruned_counts(n_prune, W2.shape[1], block_size)
    return _obs_sweep(W2, H, damp, block_size, counts, nm)


def obs_prune_weight(W: Tensor, H: Tensor, sparsity: float, block_size: int = 128, damp: float = 0.01,
                     nm: NMPattern = None) -> tuple[Tensor, Tensor]:
    """Prune ``W`` against the Hessian ``H`` of its reconstruction error (SparseGPT).

    Args:
        W: weights, floating point, rank >= 2, viewed as ``(rows, cols)`` (``rows = W.shape[0]``).
        H: ``(cols, cols)`` symmetric positive semi-definite, e.g. ``2/n X^T X`` of the layer's
            inputs ``X`` (n x cols); same device as ``W``.
        sparsity: fraction pruned, in [0, 1); exactly ``round(sparsity * W.numel())`` weights are
            pruned (``1 - N/M`` with ``nm``).
        block_size: columns per block (mask chosen per block; lazy updates between blocks).
        damp: ``damp * mean(diag H)`` is added to ``H``'s diagonal; 0 needs a positive definite ``H``.
        nm: None (unstructured), or an ``N:M`` pattern as ``"2:4"`` or ``(2, 4)``: ``N`` kept of
            every ``M`` consecutive columns; ``block_size`` must be a multiple of ``M``.
    Returns:
        ``(W_new, mask)``: the updated weights (``W``'s shape and dtype, pruned entries exactly
        0) and the bool keep mask (``W``'s shape). Computed in float32 (float64 if ``W`` or ``H``
        is float64).
    Raises:
        ValueError: bad arguments, NaN/inf in ``W`` or ``H``, a non-symmetric ``H``, a negative
        diagonal entry, or an ``H`` that is not positive definite after damping.
    """
    W2, Hw, nm, n_prune, _ = _check_problem(W, H, sparsity, block_size, damp, nm)
    W_new, keep = _obs_prune_2d(W2, Hw, n_prune, nm, block_size, damp)
    return W_new.reshape(W.shape).to(W.dtype), keep.reshape(W.shape)


# ----------------------------------------------------------------------------------------------
# Reference: SparseGPT's loop, transcribed

def _keep_largest_ref(scores: Tensor, k: int) -> Tensor:
    flat = scores.float().reshape(-1) + 0.0  # -0.0 -> +0.0, as topk_mask
    order = torch.sort(flat, descending=True, stable=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    keep[order[:k]] = True
    return keep.reshape(scores.shape)


def obs_prune_weight_ref(W: Tensor, H: Tensor, sparsity: float, block_size: int = 128, damp: float = 0.01,
                         nm: NMPattern = None) -> tuple[Tensor, Tensor]:
    """Readable reference of :func:`obs_prune_weight`: SparseGPT's ``fasterprune`` loop in plain
    torch (three factorisations for ``U``, one column at a time, per-column ``index_put`` and a
    rank-1 update of the whole rest of the block), with this module's exact-count mask rule.
    Same arguments and result; float64 inputs run in float64."""
    W2, H, nm, n_prune, _ = _check_problem(W, H, sparsity, block_size, damp, nm)
    W1all, H = _dead_inputs(W2, H)
    rows, cols = W1all.shape
    L, info = torch.linalg.cholesky_ex(_damped(H, damp))
    if info.item() > 0:
        raise _not_positive_definite(int(info.item()) - 1, damp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    counts = _block_pruned_counts(n_prune, cols, block_size)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W2.device)
    Wk = W1all
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        count = i2 - i1
        W1 = Wk[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if nm is None:
            tmp = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
            prune1 = ~_keep_largest_ref(tmp, rows * count - counts[b])
        else:
            prune1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                tmp = W1[:, i:i + m] ** 2 / torch.diag(Hinv1)[i:i + m].reshape(1, -1) ** 2
                # Keep the n largest of each row; stable: the lower column wins ties (nm_mask's rule).
                order = torch.sort(tmp, dim=1, descending=True, stable=True).indices
                prune1[:, i:i + m].scatter_(1, order[:, n:], True)
            q = w.clone()
            q[prune1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        Wk[:, i1:i2] = Q1
        Wk[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
        keep[:, i1:i2] = ~prune1
    return Wk.reshape(W.shape).to(W.dtype), keep.reshape(W.shape)


# ----------------------------------------------------------------------------------------------
# Model level

def _input_columns(module: MaskedModule, x: Tensor) -> Tensor:
    """The layer's input as ``(samples, cols_total)``: one row per token (Linear) or output
    position (Conv2d: the unfolded input after padding, channel-major ``(ci, kh, kw)`` columns)."""
    if isinstance(module, SparseConv2d):
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _HessianHook:
    """Forward pre-hook summing ``X_g^T X_g`` per group over every call (``(groups, c, c)``)."""

    def __init__(self, name: str, groups: int, cols: int, dtype: torch.dtype):
        self.name, self.groups, self.cols, self.dtype = name, groups, cols, dtype
        self.sum: Optional[Tensor] = None
        self.samples = 0
        self.batch = 0

    def __call__(self, module, args) -> None:
        X = _input_columns(module, args[0].detach()).to(self.dtype)
        if not torch.isfinite(X).all():
            raise ValueError(f"calib_data: batch {self.batch} gives NaN or inf inputs to layer '{self.name}'")
        Xg = X.reshape(X.shape[0], self.groups, self.cols).transpose(0, 1)  # (groups, samples, cols)
        xtx = Xg.mT @ Xg
        self.sum = xtx if self.sum is None else self.sum.add_(xtx)
        self.samples += X.shape[0]


def _layer_hessian(model: nn.Module, name: str, layer: MaskedModule, calib_data, dtype: torch.dtype) -> Tensor:
    """``2/n X^T X`` of ``layer``'s inputs over every calibration batch, ``(groups, cols, cols)``."""
    groups = getattr(layer, "groups", 1)
    cols = selection_shape(layer.weight.shape)[1]
    hook = _HessianHook(name, groups, cols, dtype)
    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad(), buffers_restored(model):
            for hook.batch, x in enumerate(calib_inputs(calib_data)):
                model(x)
    finally:
        handle.remove()
    if hook.sum is None or hook.samples == 0:
        raise ValueError(f"calib_data: layer '{name}' received no input samples during calibration")
    return hook.sum * (2.0 / hook.samples)


def _check_calib_data(calib_data) -> None:
    if calib_data is None:
        raise ValueError("calib_data: expected calibration inputs (a tensor or a list/DataLoader of batches), "
                         "got None")
    if isinstance(calib_data, Tensor):
        return
    if isinstance(calib_data, Iterator) or not isinstance(calib_data, Iterable):
        raise TypeError(f"calib_data: expected a tensor or a re-iterable collection of batches (list, DataLoader); "
                        f"obs_layerwise reads it once per layer, so a one-shot iterator cannot be used, got "
                        f"{type(calib_data).__name__}")
    for _ in calib_data:
        return
    raise ValueError("calib_data: expected at least one batch, got none")


@torch.no_grad()
def _prune_layer(name: str, layer: MaskedModule, H: Tensor, sparsity: float, nm, block_size: int,
                 damp: float) -> None:
    W = layer.weight
    rows, cols = selection_shape(W.shape)
    groups = H.shape[0]
    dtype = H.dtype
    W2 = W.detach().reshape(rows, cols).to(dtype)
    if not torch.isfinite(W2).all():
        raise ValueError(f"layer '{name}': weight contains NaN or inf")
    H = _check_hessian(H, f"Hessian of layer '{name}'")
    n_prune = W.numel() - target_kept(W.numel(), sparsity)
    # Exact layer count spread over equal groups like over blocks (rows_g * cols weights each).
    group_counts = _block_pruned_counts(n_prune, groups, 1)
    rows_g = rows // groups
    W_new, keep = torch.empty_like(W2), torch.empty(rows, cols, dtype=torch.bool, device=W.device)
    for g in range(groups):
        r = slice(g * rows_g, (g + 1) * rows_g)
        try:
            W_new[r], keep[r] = _obs_prune_2d(W2[r], H[g], group_counts[g], nm, block_size, damp)
        except ValueError as e:
            where = f"layer '{name}'" + (f" (group {g})" if groups > 1 else "")
            raise ValueError(f"{where}: {e}") from None
    layer.weight.copy_(W_new.reshape(W.shape))
    layer.set_mask(keep.reshape(W.shape))


@restores_on_error
def obs_layerwise(model: nn.Module, calib_data, sparsity: float, block_size: int = 128, damp: float = 0.01,
                  pattern: str = "unstructured", exclude: Selector = None) -> SparsityReport:
    """Prune every sparse layer of ``model`` in place with layer-wise OBS (SparseGPT).

    Layers are pruned one at a time in module order; each layer's Hessian ``2/n X^T X`` is
    accumulated by a forward pre-hook over all of ``calib_data`` (one full forward pass a layer,
    under ``no_grad``, in the model's current train/eval mode, buffers restored), so its inputs
    come from the already pruned layers before it. The layer's weights are replaced by the OBS
    update and its mask set (``set_mask``). Pruned weights are not held pruned: the masks are
    recomputed from the current weights (zeros score lowest).

    Args:
        model: a model with sparse layers (``sparse_engine.sparsify``).
        calib_data: calibration inputs: a tensor (one batch), or a re-iterable collection (list,
            ``DataLoader``) of batches, each a tensor or a tuple whose first element is the input.
        sparsity: every layer's pruned fraction, in [0, 1); each layer prunes exactly
            ``round(sparsity * n_l)`` weights (``1 - N/M`` with an N:M pattern).
        block_size, damp: see :func:`obs_prune_weight`.
        pattern: ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``); every layer's column count
            must then be a multiple of ``M`` (exclude the others).
        exclude: layers to leave as they are (glob patterns, a list of them, or a callable).
    Returns:
        ``sparsity_report(model)``.
    """
    sparsity = _check_sparsity(sparsity)
    _check_options(block_size, damp)
    gran: Granularity = parse_granularity(pattern)
    if gran.kind == "block":
        raise ValueError(f"pattern: expected 'unstructured' or 'N:M' (OBS prunes single weights), got {pattern!r}")
    nm = _parse_nm((gran.n, gran.m), sparsity, block_size) if gran.kind == "nm" else None
    layers = prunable_layers(model, exclude)
    for name, layer in layers:
        gran.check_layer(name, layer.weight.shape)
        require_input_kind(name, layer, "obs_layerwise")
    _check_calib_data(calib_data)
    for name, layer in layers:
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        H = _layer_hessian(model, name, layer, calib_data, dtype)
        _prune_layer(name, layer, H, sparsity, nm, block_size, damp)
    return sparsity_report(model)
