"""The CHITA solver (Benbaki et al., ICML 2023, "Fast as CHITA: Neural Network Pruning with
Combinatorial Optimization"): the L0-constrained least-squares problem on a low-rank Fisher.
The model-level ``chita`` and ``chita_plus_plus`` are in ``sparse_engine.pruning.second_order.chita``.

    w, keep = chita_solve(X, w0, k, l2)          # one problem
    w, keep = chita_solve_blocks(X, w0, ks, l2)  # many blocks at once

The problem. Around the trained weights ``w0`` the loss is modelled by the empirical Fisher
``X^T X``, where the rows of ``X`` (n x p) are ``n`` per-sample (or mini-batch) gradients divided by
``sqrt(n)``. With ``y = X w0`` (the paper's choice: ``w0`` taken as a local minimum, so the
first-order term is dropped) CHITA solves

    min_w  Q(w) = 1/2 ||X w - y||^2 + l2/2 ||w - w0||^2     s.t.  ||w||_0 <= k,

i.e. ``1/2 (w - w0)^T (X^T X) (w - w0)`` plus a ridge, without ever forming the p x p Hessian.

The solver (``chita_solve``; ``chita_solve_blocks`` for many blocks at once):

1. Start at magnitude pruning, ``w = P_k(w0)`` (the top-k |w0|): the paper's first IHT step from
   ``w0``, where the gradient vanishes when ``y = X w0``.
2. IHT steps ``w <- P_k(w - tau g)``, ``g = X^T (X w - y) + l2 (w - w0)``, ``P_k`` keeping the
   k largest ``|.|`` through ``sparse_engine.ops.topk_mask`` (exactly k kept; ties go to the
   lower index). Step sizes follow the paper's scheme (``hard_thresholding_ls`` in the authors'
   code): with ``S`` the current support and ``g_S`` the gradient on it,
     - ``tau* = ||g_S||^2 / (||X g_S||^2 + l2 ||g_S||^2)`` minimises Q exactly along ``-g_S``;
     - ``tau_c`` is the largest step after which ``P_k`` still keeps ``S``: for ``i`` in ``S``,
       ``|w_i - tau g_i| >= tau max_{j not in S} |g_j|``;
     - if ``tau* < tau_c`` the step is the exact line minimiser on the support (support kept);
       otherwise a search tries the steps ``tau0 * 2^j``, ``j < search_iters``, from
       ``tau0 = max(tau_c / (1 + 1e-4), 1 / L)``, and takes the best if it decreases Q.
   Departures from the authors' code: their search doubles only while Q decreases; here every
   doubling is evaluated (at a point already optimal on its support the first candidate leaves
   Q unchanged, so that stop would be decided by rounding). A support gradient below
   ``sqrt(eps)`` of the gradient counts as zero (its ``tau*`` is rounding noise). The ``1/L``
   floor keeps a near-zero kept weight from freezing the search at tiny steps.
   ``L`` estimates the Lipschitz constant ``lambda_max(X^T X) + l2`` by power iteration (x1.05,
   as the authors' code). When an iteration decreases Q by no more than ``tol`` times the run's
   starting objective, a support-changing search (the authors' active-set search: steps
   ``2^j / (2L)``, ``j < 10``) looks for a better support; if none decreases Q the run has
   converged. Every accepted step decreases Q, so Q never exceeds magnitude pruning's.
   ``step="lipschitz"`` replaces all this by classical IHT, the constant step ``1/L`` (an
   ablation; it too stops when Q no longer decreases).
3. Backsolve on the final support ``S`` (``chita_backsolve``): the exact minimiser of Q over
   vectors supported on ``S``. Writing ``w_S = w0_S + d`` and ``rho = y - X_S w0_S``:

       d = (l2 I + X_S^T X_S)^-1 X_S^T rho            (|S| <= n: a |S| x |S| Cholesky)
         = X_S^T (l2 I + X_S X_S^T)^-1 rho            (n < |S|: Woodbury, an n x n Cholesky)

   The second line is the Woodbury identity ``(l2 I + X_S^T X_S)^-1 = (1/l2)(I - X_S^T (l2 I +
   X_S X_S^T)^-1 X_S)`` applied to ``X_S^T rho`` (the push-through form), which needs no 1/l2
   and so does not cancel when l2 is small. Both equal the textbook solve of
   ``(X_S^T X_S + l2 I) w_S = X_S^T y + l2 w0_S``. The Cholesky factorisations are batched
   (``sparse_engine.ops.block_solve``); a float32 system that does not factor is redone in float64.
4. If IHT left magnitude's support and the backsolve on magnitude's support is better, that is
   kept: the result is never worse than magnitude pruning followed by its backsolve. IHT then
   restarts from the backsolved point (``rounds`` runs in all): where it finds a better support,
   that support is backsolved in turn.

Dead weights (``prune_dead=True``, the default). A weight whose column of ``X`` is zero has no
gradient on any sampled row: a dead ReLU unit's weights, or, in CHITA++, a unit that earlier
stages cut off. Q then sees it only through its ridge term ``l2/2 (w_i - w0_i)^2``, which keeping
it at ``w0_i`` makes zero: in the full problem a dead weight is free to keep and costs budget that
live weights need (on a trained MLP 784-40-20-10 at 98% sparsity, 6.5% of the budget went to
dead weights; by the last of 16 CHITA++ stages most columns are dead). As the authors' solver
does (``Active_IHTCDLS_PP`` in mazumder-lab/CHITA), the problem is restricted to the live
columns: dead weights are pruned and their ridge terms dropped, and the k weights are chosen
among the live ones. When fewer than k weights are live, all live weights are kept and the
rest of the budget goes to the dead weights of largest ``|w0|``, kept at ``w0`` (their exact
optimum in Q; the authors' code keeps fewer than k instead): exactly k are kept either way.
``prune_dead=False`` solves the full problem (the behaviour before this option existed).
"""
import math
import numbers
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from sparse_engine.ops.block_solve import block_solve
from sparse_engine.ops.mask_pack import unpack_mask
from sparse_engine.ops.topk_mask import topk_mask


_POWER_ITERS = 20
_LIPSCHITZ_SAFETY = 1.05       # the authors' 1.05 * (sigma_max^2 + l2)
_TAU_C_MARGIN = 1e-4           # the paper's search starts at tau_c / (1 + 1e-4)
_SWAP_SEARCH_ITERS = 10        # the authors' active-set search: 10 doublings from 1/(2L)
_WORKSPACE_ELEMS = 1 << 25     # per chunk of blocks in chita_solve_blocks (128 MiB of float32)


# ----------------------------------------------------------------------------------------------
# The quadratic problem, batched: X (B, n, m), y (B, n), w0 / w (B, m), ks (B,), valid (B, m).
# ----------------------------------------------------------------------------------------------

def _mv(X: Tensor, v: Tensor) -> Tensor:
    return torch.bmm(X, v.unsqueeze(-1)).squeeze(-1)


def _tmv(X: Tensor, u: Tensor) -> Tensor:
    return torch.bmm(u.unsqueeze(1), X).squeeze(1)


def _objective(r: Tensor, w: Tensor, w0: Tensor, l2: float) -> Tensor:
    return 0.5 * (r * r).sum(-1) + 0.5 * l2 * ((w - w0) ** 2).sum(-1)


def _lipschitz(X: Tensor, l2: float) -> Tensor:
    """``1.05 (lambda_max(X_b^T X_b) + l2)`` per block, by power iteration."""
    B, _, m = X.shape
    gen = torch.Generator().manual_seed(0)
    # One start vector for every block: a block's L does not depend on the batch it is solved in.
    v = torch.randn(m, generator=gen, dtype=torch.float64).to(device=X.device, dtype=X.dtype).expand(B, m)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(torch.finfo(X.dtype).tiny)
    lam = torch.zeros(B, dtype=X.dtype, device=X.device)
    for _ in range(_POWER_ITERS):
        u = _tmv(X, _mv(X, v))
        lam = (u * v).sum(1)
        norm = u.norm(dim=1, keepdim=True)
        if not (norm > 0).all():  # X v = 0 for some block: a zero block or an unlucky start
            u = torch.where(norm > 0, u, v)
            norm = u.norm(dim=1, keepdim=True)
        v = u / norm
    return _LIPSCHITZ_SAFETY * (lam.clamp_min(0) + l2)


def _topk_rows(scores: Tensor, ks: Tensor) -> Tensor:
    """Keep the ``ks[b]`` largest scores of each row (bool (B, m)), ties to the lower index.
    Scores are compared in float32 (topk_mask's precision) on both paths, so they agree."""
    B, m = scores.shape
    scores = scores.float()
    if B == 1:
        bits = topk_mask(scores, int(ks[0]))[0]
        return unpack_mask(bits, (1, m))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=scores.device).expand(B, m))
    return rank < ks.unsqueeze(1)


def _hard_threshold(v: Tensor, ks: Tensor, valid: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    scores = v.abs() if valid is None else torch.where(valid, v.abs(), -1.0)
    keep = _topk_rows(scores, ks)
    return torch.where(keep, v, 0.0), keep


def _support_step_limit(w: Tensor, g: Tensor, keep: Tensor, valid: Optional[Tensor]) -> Tensor:
    """``tau_c``: the largest step for which ``P_k(w - tau g)`` keeps the support ``keep``."""
    off = ~keep if valid is None else ~keep & valid
    M = torch.where(off, g.abs(), 0.0).amax(1, keepdim=True) if w.shape[1] else w.new_zeros(w.shape[0], 1)
    absw, absg = w.abs(), g.abs()
    same = (torch.sign(w) == torch.sign(g)) & (g != 0)
    inf = torch.full_like(w, math.inf)
    lim = torch.where(same, absw / (absg + M), torch.where(absg < M, absw / (M - absg), inf))
    lim = torch.where(keep & (M > 0), lim, inf)  # no competitor with a gradient: any step keeps S
    return lim.amin(1) if w.shape[1] else w.new_full((w.shape[0],), math.inf)


def _search(X, y, w0, l2, ks, valid, w, g, tau, rows, iters, best):
    """Doubling search on the rows ``rows``: the candidates ``P_k(w - tau 2^j g)``, j < ``iters``,
    against the running best ``best = (w, keep, r, f)``. Every doubling is evaluated (the paper
    stops at the first that does not decrease Q; at a point stationary on its support the first
    candidate keeps the support and leaves Q unchanged, so that stop would be decided by
    rounding). Returns the new best and the rows that improved."""
    B = X.shape[0]
    if B > 1 and 2 * int(rows.sum()) <= B:
        # Few rows search: copy theirs out (one pass over their X) rather than evaluate all rows.
        idx = rows.nonzero().squeeze(1)
        sub = [None if t is None else t[idx] for t in (X, y, w0, ks, valid, w, g, tau)]
        found, improved_sub = _search(*sub[:3], l2, *sub[3:], rows[idx], iters, tuple(t[idx] for t in best))
        best = tuple(t.index_put((idx,), v) for t, v in zip(best, found))
        return best, torch.zeros_like(rows).index_put((idx,), improved_sub)
    w_b, keep_b, r_b, f_b = best
    improved = torch.zeros_like(rows)
    for _ in range(iters):
        cand, keep_c = _hard_threshold(w - tau.unsqueeze(1) * g, ks, valid)
        r_c = _mv(X, cand) - y
        f_c = _objective(r_c, cand, w0, l2)
        better = rows & (f_c < f_b)
        b1 = better.unsqueeze(1)
        w_b, keep_b, r_b = torch.where(b1, cand, w_b), torch.where(b1, keep_c, keep_b), torch.where(b1, r_c, r_b)
        f_b = torch.where(better, f_c, f_b)
        improved |= better
        tau = tau * 2
    return (w_b, keep_b, r_b, f_b), improved


def _iht(X, y, w0, l2, ks, valid, w, keep, L, opts: "_Options"):
    """IHT from ``(w, keep)`` with the paper's step sizes (module docstring, step 2), or with the
    classical constant step ``1/L`` (``step="lipschitz"``), accepted only while Q decreases.
    Rows that have converged leave the batch once they are half of it."""
    out_w, out_keep = w.clone(), keep.clone()
    rows = torch.arange(X.shape[0], device=X.device)  # the original index of each working row
    r = _mv(X, w) - y
    f = _objective(r, w, w0, l2)
    stall = opts.tol * f.abs()
    done = torch.zeros(X.shape[0], dtype=torch.bool, device=X.device)
    for _ in range(opts.iters):
        finished = int(done.sum())
        if finished == len(rows):
            break
        if finished and 2 * finished >= len(rows):
            out_w[rows[done]], out_keep[rows[done]] = w[done], keep[done]
            live = (~done).nonzero().squeeze(1)
            X, y, w0, ks, w, keep, r, f, L, stall, rows = (t[live] for t in (X, y, w0, ks, w, keep, r, f, L, stall,
                                                                              rows))
            valid = None if valid is None else valid[live]
            done = done[live]
        act = ~done
        g = _tmv(X, r) + l2 * (w - w0)
        if opts.step == "lipschitz":
            best, _ = _search(X, y, w0, l2, ks, valid, w, g, 1 / L, act, 1, (w, keep, r, f))
            done |= act & ~(f - best[3] > stall)
            w, keep, r, f = best
            continue
        gS = torch.where(keep, g, 0.0)
        num = (gS * gS).sum(1)
        XgS = _mv(X, gS)
        den = (XgS * XgS).sum(1) + l2 * num
        tau_star = torch.where(num > 0, num / den.clamp_min(torch.finfo(X.dtype).tiny), 0.0)
        tau_c = _support_step_limit(w, g, keep, valid)
        # A support gradient below sqrt(eps) of the gradient is rounding (e.g. after a backsolve):
        # its tau* is noise, which must not decide between the exact step and the search.
        exact = act & (num > torch.finfo(X.dtype).eps * (g * g).sum(1)) & (tau_star < tau_c)
        e1 = exact.unsqueeze(1)
        best = (torch.where(e1, w - tau_star.unsqueeze(1) * gS, w), keep,
                torch.where(e1, r - tau_star.unsqueeze(1) * XgS, r), torch.where(exact, f - 0.5 * tau_star * num, f))
        search = act & ~exact
        if search.any():
            tau0 = torch.maximum(torch.nan_to_num(tau_c / (1 + _TAU_C_MARGIN), posinf=0.0), 1 / L)
            best, _ = _search(X, y, w0, l2, ks, valid, w, g, tau0, search, opts.search_iters, best)
        stalled = act & ~(f - best[3] > stall)
        if stalled.any():
            best, swapped = _search(X, y, w0, l2, ks, valid, w, g, 0.5 / L, stalled, _SWAP_SEARCH_ITERS, best)
            done |= stalled & ~swapped
        w, keep, r, f = best
    out_w[rows], out_keep[rows] = w, keep
    return out_w, out_keep


def _support_step(XS: Tensor, rho: Tensor, l2: float, woodbury: bool) -> Tensor:
    """``d = (l2 I + XS^T XS)^-1 XS^T rho``: directly (a k x k Cholesky) or by Woodbury (n x n)."""
    B, n, k = XS.shape
    if woodbury:
        K = torch.baddbmm(torch.diag_embed(XS.new_full((B, n), l2)), XS, XS.transpose(1, 2))
        return _tmv(XS, block_solve(K, rho))
    A = torch.baddbmm(torch.diag_embed(XS.new_full((B, k), l2)), XS.transpose(1, 2), XS)
    return block_solve(A, _tmv(XS, rho))


def _backsolve(X: Tensor, y: Tensor, w0: Tensor, keep: Tensor, l2: float, woodbury: Optional[bool] = None) -> Tensor:
    """Minimiser of Q over each row's support ``keep`` (module docstring, step 3); Woodbury when
    ``woodbury`` is True, or by default when n < the largest support."""
    B, n, m = X.shape
    counts = keep.sum(1)
    kmax = int(counts.max()) if B else 0
    if kmax == 0:
        return torch.zeros_like(w0)
    idx = torch.sort(keep.to(torch.uint8), dim=1, descending=True, stable=True).indices[:, :kmax]
    slot = torch.arange(kmax, device=X.device) < counts.unsqueeze(1)  # padding slots of smaller supports
    XS = torch.gather(X, 2, idx.unsqueeze(1).expand(B, n, kmax)) * slot.unsqueeze(1)
    w0S = torch.gather(w0, 1, idx) * slot
    rho = y - _mv(XS, w0S)
    woodbury = n < kmax if woodbury is None else woodbury
    try:
        d = _support_step(XS, rho, l2, woodbury)
    except ValueError as err:  # not positive definite as rounded: float32 systems are redone in float64
        if X.dtype == torch.float64:
            raise ValueError(f"backsolve: a support system is not positive definite even in float64 (l2={l2:g} "
                             f"too small for the gradients' scale?); increase l2. {err}") from err
        d = _support_step(XS.double(), rho.double(), l2, woodbury).to(X.dtype)
    return torch.zeros_like(w0).scatter_(1, idx, (w0S + d) * slot)


class _Options(NamedTuple):
    iters: int
    search_iters: int
    rounds: int
    tol: float
    backsolve: bool
    step: str


def _solve_batched(X, y, w0, ks, l2, valid, opts: _Options):
    B = X.shape[0]

    def pick(t: Optional[Tensor], idx: Tensor) -> Optional[Tensor]:
        # Advanced indexing copies: the (single, large) problem of chita_solve must not be.
        return t if t is None or len(idx) == B else t[idx]

    def Q(Xr, yr, w0r, w):
        return _objective(_mv(Xr, w) - yr, w, w0r, l2)

    w, keep = _hard_threshold(w0, ks, valid)
    if opts.iters == 0 and not opts.backsolve:
        return w, keep
    L = _lipschitz(X, l2)
    w_it, keep_it = _iht(X, y, w0, l2, ks, valid, w, keep, L, opts)
    if not opts.backsolve:
        return w_it, keep_it
    w_bs = _backsolve(X, y, w0, keep_it, l2)
    # Never worse than magnitude pruning plus its backsolve: where IHT left magnitude's support,
    # compare with that support's optimum (one more backsolve, of those rows only).
    left = (keep_it != keep).any(1).nonzero().squeeze(1)
    if len(left):
        Xl, yl, w0l = pick(X, left), pick(y, left), pick(w0, left)
        w_mag = _backsolve(Xl, yl, w0l, keep[left], l2)
        back = Q(Xl, yl, w0l, w_mag) < Q(Xl, yl, w0l, w_bs[left])
        w_bs[left[back]], keep_it[left[back]] = w_mag[back], keep[left[back]]
    w, keep = w_bs, keep_it
    # Further rounds restart IHT from the backsolved points; only rows whose support moves are
    # backsolved again (the others hold the exact optimum of their support already).
    rows = torch.arange(B, device=X.device)
    for _ in range(opts.rounds - 1):
        Xr, yr, w0r = pick(X, rows), pick(y, rows), pick(w0, rows)
        w_it, keep_it = _iht(Xr, yr, w0r, l2, pick(ks, rows), pick(valid, rows), pick(w, rows), pick(keep, rows),
                             pick(L, rows), opts)
        moved = (keep_it != pick(keep, rows)).any(1)
        if not moved.any():
            break
        if not moved.all():
            rows, keep_it = rows[moved], keep_it[moved]
            Xr, yr, w0r = pick(X, rows), pick(y, rows), pick(w0, rows)
        keep[rows] = keep_it
        w[rows] = _backsolve(Xr, yr, w0r, keep_it, l2)
    return w, keep


def _live_columns(X: Tensor) -> Tensor:
    """(B, m) bool: the columns of X (B, n, m) with a non-zero entry, a few rows at a time (no
    n x m temporary)."""
    B, n, m = X.shape
    rows = max(1, _WORKSPACE_ELEMS // max(1, 8 * B * m))
    live = torch.zeros(B, m, dtype=torch.bool, device=X.device)
    for i in range(0, n, rows):
        live |= (X[:, i:i + rows] != 0).any(1)
    return live


def _solve(X, y, w0, ks, l2, valid, opts: _Options, prune_dead: bool):
    """``_solve_batched``, restricted to the live columns when ``prune_dead`` (module docstring,
    dead weights): dead columns are treated as padding (invalid, w0 zero there: no ridge term),
    budgets are capped at the live count, and what is left of a budget is filled with the dead
    weights of largest |w0|, kept at w0."""
    if not prune_dead:
        return _solve_batched(X, y, w0, ks, l2, valid, opts)
    live = _live_columns(X)
    if valid is not None:
        live &= valid
    if bool(live.all()):
        return _solve_batched(X, y, w0, ks, l2, valid, opts)
    ks = ks.to(live.device)
    ks_live = torch.minimum(ks, live.sum(1))
    w, keep = _solve_batched(X, y, torch.where(live, w0, 0.0), ks_live, l2, live, opts)
    extra = ks - ks_live
    if bool((extra > 0).any()):
        dead = ~live if valid is None else valid & ~live
        fill = _topk_rows(torch.where(dead, w0.abs(), -1.0), extra)
        w, keep = torch.where(fill, w0, w), keep | fill
    return w, keep


# ----------------------------------------------------------------------------------------------
# Public solvers
# ----------------------------------------------------------------------------------------------

def _check_number(value, name: str, *, positive: bool = False) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0) or (not positive and value < 0):
        raise ValueError(f"{name}: expected a finite number {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")
    return int(value)


def _check_bool(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


CHITA_STEPS = ("search", "lipschitz")


def _options(iters, search_iters, rounds, tol, backsolve, step) -> _Options:
    if step not in CHITA_STEPS:
        raise ValueError(f"step: expected one of {CHITA_STEPS}, got {step!r}")
    _check_bool(backsolve, "backsolve")
    return _Options(_check_int(iters, "iters", 0), _check_int(search_iters, "search_iters", 1),
                    _check_int(rounds, "rounds", 1), _check_number(tol, "tol"), backsolve, step)


def _check_problem(X: Tensor, w0: Tensor, y: Optional[Tensor], l2, batched: bool) -> Tensor:
    dims = 3 if batched else 2
    what = "(B, n, m)" if batched else "(n, p)"
    if not isinstance(X, Tensor) or X.dim() != dims or not X.is_floating_point():
        raise ValueError(f"X: expected a floating-point tensor of shape {what}, got "
                         f"{tuple(X.shape) if isinstance(X, Tensor) else type(X).__name__}")
    if not isinstance(w0, Tensor) or w0.dtype != X.dtype or w0.device != X.device:
        raise ValueError(f"w0: expected a tensor of X's dtype {X.dtype} on {X.device}, got "
                         f"{(w0.dtype, w0.device) if isinstance(w0, Tensor) else type(w0).__name__}")
    _check_number(l2, "l2", positive=True)
    for name, t in (("X", X), ("w0", w0)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or Inf")
    n = X.shape[-2]
    if not batched and w0.numel() != X.shape[1]:
        raise ValueError(f"w0: expected {X.shape[1]} elements (X's columns), got {w0.numel()}")
    if batched and tuple(w0.shape) != (X.shape[0], X.shape[2]):
        raise ValueError(f"w0: expected shape {(X.shape[0], X.shape[2])}, got {tuple(w0.shape)}")
    if y is None:
        return _mv(X, w0) if batched else X @ w0.reshape(-1)
    if not isinstance(y, Tensor) or y.dtype != X.dtype or y.device != X.device:
        raise ValueError(f"y: expected None or a tensor of X's dtype {X.dtype} on {X.device}")
    expected = (X.shape[0], n) if batched else (n,)
    if tuple(y.shape) != expected:
        raise ValueError(f"y: expected shape {expected}, got {tuple(y.shape)}")
    if not torch.isfinite(y).all():
        raise ValueError("y: contains NaN or Inf")
    return y


def chita_objective(X: Tensor, w: Tensor, w0: Tensor, l2: float, y: Optional[Tensor] = None) -> Tensor:
    """``Q(w) = 1/2 ||X w - y||^2 + l2/2 ||w - w0||^2`` (``y = X w0`` by default); X (n, p) and
    vectors of p elements (any shape), or batched X (B, n, m) with (B, m) vectors (one Q per row)."""
    if X.dim() == 3:
        y = _mv(X, w0) if y is None else y
        return _objective(_mv(X, w) - y, w, w0, l2)
    w, w0 = w.reshape(-1), w0.reshape(-1)
    y = X @ w0 if y is None else y
    return _objective(X @ w - y, w, w0, l2)


def chita_backsolve(X: Tensor, w0: Tensor, keep: Tensor, l2: float, *, y: Optional[Tensor] = None,
                    method: str = "auto") -> Tensor:
    """The minimiser of Q over the vectors supported on ``keep`` (a bool tensor of w0's shape):
    ``(X_S^T X_S + l2 I) w_S = X_S^T y + l2 w0_S`` (module docstring, step 3). ``method``:
    ``"auto"`` (Woodbury's n x n system when ``n < |S|``, else the |S| x |S| one), ``"woodbury"``
    or ``"direct"``. Returns w, of w0's shape, zero outside ``keep``."""
    if method not in ("auto", "woodbury", "direct"):
        raise ValueError(f"method: expected 'auto', 'woodbury' or 'direct', got {method!r}")
    y = _check_problem(X, w0, y, l2, batched=False)
    if not isinstance(keep, Tensor) or keep.dtype != torch.bool or keep.numel() != w0.numel():
        raise ValueError(f"keep: expected a bool tensor of {w0.numel()} elements")
    p = w0.numel()
    woodbury = None if method == "auto" else method == "woodbury"
    w = _backsolve(X.unsqueeze(0), y.unsqueeze(0), w0.reshape(1, p), keep.reshape(1, p).to(X.device), float(l2),
                   woodbury)
    return w.reshape(w0.shape)


def chita_solve(X: Tensor, w0: Tensor, k: int, l2: float, *, y: Optional[Tensor] = None, iters: int = 100,
                step: str = "search", search_iters: int = 5, rounds: int = 3, tol: float = 1e-5,
                backsolve: bool = True, prune_dead: bool = True) -> tuple[Tensor, Tensor]:
    """Solve ``min Q(w) s.t. ||w||_0 <= k`` by IHT with the paper's step sizes and a backsolve.

    Args:
        X: (n, p) float tensor, the scaled gradients (``X^T X`` is the empirical Fisher).
        w0: p elements (any shape) of X's dtype and device: the weights around which Q is built.
        k: weights kept, in [0, p]; exactly k positions are selected.
        l2: ridge weight, > 0 (it keeps every support system positive definite).
        y: (n,) target; default ``X w0`` (the paper's choice).
        iters: IHT iterations per round (gradient evaluations); 0 gives magnitude pruning plus,
            with ``backsolve``, the backsolve on its support.
        step: ``"search"``: the paper's step sizes (module docstring); ``"lipschitz"``: classical
            IHT, the constant step ``1/L``, stopping when it no longer decreases Q.
        search_iters: doublings of the step-size search.
        rounds: IHT runs, each restarted from the previous backsolve (module docstring, step 4).
        tol: an IHT iteration whose decrease is at most ``tol`` times the run's starting Q
            triggers the support-changing search; if that fails too, the run stops.
        backsolve: solve exactly on the final support (else return the last IHT iterate).
        prune_dead: restrict the problem to the live columns of X (module docstring, dead
            weights): zero columns are pruned, unless fewer than k columns are live.
    Returns:
        ``(w, keep)``: w of w0's shape, zero outside keep, and keep, a bool tensor with exactly
        k True. ``Q(w)`` is never above magnitude pruning's ``Q(w0 * top-k(|w0|))``, nor, with
        ``backsolve``, above the backsolve on magnitude's support (with ``prune_dead``, in the
        problem restricted to the live columns, magnitude pruning choosing among them).
    """
    y = _check_problem(X, w0, y, l2, batched=False)
    n, p = X.shape
    k = _check_int(k, "k", 0)
    if k > p:
        raise ValueError(f"k: expected an int in [0, {p}], got {k}")
    opts = _options(iters, search_iters, rounds, tol, backsolve, step)
    _check_bool(prune_dead, "prune_dead")
    ks = torch.tensor([k])  # on the host: the single-problem selection reads k as an int
    w, keep = _solve(X.unsqueeze(0), y.unsqueeze(0), w0.reshape(1, p), ks, float(l2), None, opts, prune_dead)
    return w.reshape(w0.shape), keep.reshape(w0.shape)


def chita_solve_blocks(X: Tensor, w0: Tensor, ks, l2: float, *, y: Optional[Tensor] = None,
                       valid: Optional[Tensor] = None, iters: int = 100, step: str = "search", search_iters: int = 5,
                       rounds: int = 3, tol: float = 1e-5, backsolve: bool = True,
                       prune_dead: bool = True) -> tuple[Tensor, Tensor]:
    """``chita_solve`` for B independent blocks at once (the block-diagonal approximation).

    Args:
        X: (B, n, m) scaled gradients of each block; w0: (B, m); ks: B ints (tensor or sequence),
            the kept count of each block; y: (B, n), default ``X_b w0_b``.
        valid: optional (B, m) bool, False at padding positions (never kept; their X columns and
            w0 entries must be zero).
    Returns:
        ``(w, keep)``, both (B, m); row b keeps exactly ``ks[b]`` positions.
    Blocks are processed in chunks that bound the workspace (the backsolve's gathered columns and
    factor); the other arguments are those of ``chita_solve``.
    """
    y = _check_problem(X, w0, y, l2, batched=True)
    B, n, m = X.shape
    ks = torch.as_tensor(ks, device=X.device)
    if ks.shape != (B,) or ks.dtype.is_floating_point or ks.dtype == torch.bool:
        raise ValueError(f"ks: expected {B} ints (one per block), got {ks.tolist()}")
    ks = ks.long()
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool or tuple(valid.shape) != (B, m):
            raise ValueError(f"valid: expected None or a bool tensor of shape {(B, m)}")
        valid = valid.to(X.device)
    sizes = valid.sum(1) if valid is not None else torch.full_like(ks, m)
    if ((ks < 0) | (ks > sizes)).any():
        raise ValueError(f"ks: expected each block's k in [0, its number of weights], got {ks.tolist()}")
    opts = _options(iters, search_iters, rounds, tol, backsolve, step)
    _check_bool(prune_dead, "prune_dead")
    s = min(n, m)
    chunk = max(1, _WORKSPACE_ELEMS // (n * m + s * s + 16 * m))
    ws, keeps = [], []
    for b in range(0, B, chunk):
        sl = slice(b, b + chunk)
        w, keep = _solve(X[sl], y[sl], w0[sl], ks[sl], float(l2), None if valid is None else valid[sl], opts,
                         prune_dead)
        ws.append(w)
        keeps.append(keep)
    return torch.cat(ws), torch.cat(keeps)


def chita_solve_ref(X: Tensor, w0: Tensor, k: int, l2: float, *, y: Optional[Tensor] = None, iters: int = 100,
                    step: str = "search", search_iters: int = 5, rounds: int = 3, tol: float = 1e-5,
                    backsolve: bool = True, prune_dead: bool = True) -> tuple[Tensor, Tensor]:
    """Readable reference of ``chita_solve``: the same algorithm in plain torch on one vector
    (the benchmark's baseline). Every objective is recomputed from scratch, ``torch.topk`` does
    the thresholding (equal to topk_mask on tie-free inputs) and the support solve is the
    textbook one, with Woodbury in its ``(1/l2)(I - X_S^T (l2 I + X_S X_S^T)^-1 X_S)`` form when
    n < k, in float64 (that form cancels in float32). Nothing of size p x p is formed, so it
    runs on the benchmark's 1e6-weight layer."""
    n, p = X.shape
    shape = w0.shape
    w0 = w0.reshape(-1)
    y = X @ w0 if y is None else y
    live = (X != 0).any(0)
    if prune_dead and not live.all():  # solve on the live columns; fill the budget left with dead ones
        k_live = min(k, int(live.sum()))
        w_live, keep_live = chita_solve_ref(X[:, live], w0[live], k_live, l2, y=y, iters=iters, step=step,
                                            search_iters=search_iters, rounds=rounds, tol=tol, backsolve=backsolve,
                                            prune_dead=False)
        w, keep = torch.zeros_like(w0).masked_scatter(live, w_live), live.clone().masked_scatter(live, keep_live)
        fill = torch.zeros_like(keep)
        fill[torch.topk(torch.where(live, -1.0, w0.abs()), k - k_live).indices] = True
        return torch.where(fill, w0, w).reshape(shape), (keep | fill).reshape(shape)

    def Q(w):
        return 0.5 * (X @ w - y).square().sum() + 0.5 * l2 * (w - w0).square().sum()

    def threshold(v):
        keep = torch.zeros(p, dtype=torch.bool, device=v.device)
        keep[torch.topk(v.abs(), k).indices] = True
        return torch.where(keep, v, 0.0), keep

    def solve_on(keep):  # in float64: the (1/l2)(I - ...) form cancels badly in float32
        XS, ys, w0S = X[:, keep].double(), y.double(), w0[keep].double()
        b = XS.T @ ys + l2 * w0S
        eye = partial(torch.eye, dtype=torch.float64, device=X.device)
        if n < XS.shape[1]:
            wS = (b - XS.T @ torch.linalg.solve(l2 * eye(n) + XS @ XS.T, XS @ b)) / l2
        else:
            wS = torch.linalg.solve(XS.T @ XS + l2 * eye(XS.shape[1]), b)
        return torch.zeros_like(w0).masked_scatter(keep, wS.to(X.dtype))

    def doubling_search(w, g, tau, doublings, best_w, best_keep):  # the best of all doublings
        best_f, improved = Q(best_w), False
        for _ in range(doublings):
            cand, keep = threshold(w - tau * g)
            f = Q(cand)
            if f < best_f:
                best_w, best_keep, best_f, improved = cand, keep, f, True
            tau *= 2
        return best_w, best_keep, improved

    # L = 1.05 (lambda_max(X^T X) + l2) by power iteration from the solver's start vector.
    v = torch.randn(p, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(X)
    v = v / v.norm()
    for _ in range(20):
        u = X.T @ (X @ v)
        lam = u @ v
        v = u / u.norm() if u.norm() > 0 else v
    L = 1.05 * (float(lam.clamp_min(0)) + l2)

    w, keep = threshold(w0)
    magnitude = keep
    if k == 0 or (iters == 0 and not backsolve):
        return w.reshape(shape), keep.reshape(shape)
    for rnd in range(rounds):
        start_keep = keep.clone()
        stall = tol * Q(w).abs()
        for _ in range(iters):
            g = X.T @ (X @ w - y) + l2 * (w - w0)
            if step == "lipschitz":  # classical IHT: the constant step 1/L while Q decreases
                new_w, new_keep, _ = doubling_search(w, g, 1 / L, 1, w, keep)
                converged = not Q(w) - Q(new_w) > stall
                w, keep = new_w, new_keep
                if converged:
                    break
                continue
            gS = torch.where(keep, g, 0.0)
            tau_star = gS @ gS / ((X @ gS).square().sum() + l2 * gS @ gS)
            # tau_c: the largest step keeping the support: |w_i - tau g_i| >= tau M for i kept.
            M = g[~keep].abs().max() if k < p else torch.zeros((), dtype=X.dtype)
            wk, gk = w[keep].abs(), g[keep].abs()
            same = (torch.sign(w[keep]) == torch.sign(g[keep])) & (gk > 0)
            limits = torch.where(same, wk / (gk + M), torch.where(gk < M, wk / (M - gk), math.inf))
            tau_c = float(limits.min()) if M > 0 and k > 0 else math.inf
            if gS @ gS > torch.finfo(X.dtype).eps * (g @ g) and tau_star < tau_c:  # else g_S is rounding
                new_w, new_keep = w - tau_star * gS, keep
            else:
                tau0 = max(tau_c / (1 + 1e-4) if tau_c < math.inf else 0.0, 1 / L)
                new_w, new_keep, _ = doubling_search(w, g, tau0, search_iters, w, keep)
            converged = False
            if not Q(w) - Q(new_w) > stall:  # stalled: look for a better support
                new_w, new_keep, swapped = doubling_search(w, g, 0.5 / L, 10, new_w, new_keep)
                converged = not swapped
            w, keep = new_w, new_keep
            if converged:
                break
        if not backsolve:
            break
        if rnd > 0 and torch.equal(keep, start_keep):
            break
        w = solve_on(keep)
        if rnd == 0 and not torch.equal(keep, magnitude) and Q(solve_on(magnitude)) < Q(w):
            w, keep = solve_on(magnitude), magnitude  # never worse than magnitude + backsolve
    return w.reshape(shape), keep.reshape(shape)
