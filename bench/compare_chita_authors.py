"""Side by side: this library's CHITA / CHITA++ against the authors' code, on the same checkpoint
and the same per-sample gradients (Fashion-MNIST, the second-order demo's MLP 784-40-20-10, or another
bias-free MLP shape: ``--hidden``).

The authors' code (github mazumder-lab/CHITA) is not part of this repository and this script does
not fetch it: check it out yourself and pass the path. It needs numba and scikit-learn
(``pip install numba scikit-learn``).

    python bench/compare_chita_authors.py --authors /path/to/CHITA             # the recorded run
    python bench/compare_chita_authors.py --authors /path/to/CHITA --quick     # smoke test, a minute

The authors' code runs unchanged: their pruner ``pruners/CHITA.py`` (``algo='Active_IHTCDLS'``, whose
solver is ``Active_IHTCDLS_PP`` of ``CHITA_opt/L0_card_const.py``), their ``MultiStagePruner`` and
their ``generate_schedule``. Only data loading is this script's: the demo's data split
(``second_order_demo.prepare_data``) and model, a DataLoader over the same ``--n-grads`` images in the
same order at every stage (their ``run_experiment.py`` reshuffles the training set), and, where
torchvision is not installed, empty stand-in modules for the ``torchvision`` imports of their
``utils/main_utils.py`` (data sets and models this comparison does not use).

What runs:
  dense     the demo's MLP (or 784-``--hidden``-10, no biases, ReLU), trained as the demo trains it
            (``--seed``, ``--epochs``), or loaded from ``--checkpoint`` (written there when the file does not
            exist); both codes prune all of its weights
  single    at each sparsity and each l2 of ``--l2``, on one gradient matrix G (n x p per-sample
            gradients at the dense weights, eval mode): the authors' ``CHITA.prune(grads=G)`` (float64,
            as their code makes G), and ours ``chita_solve(G / sqrt(n), w0, k, l2)`` (float32, what
            ``chita`` does in its default global mode) with and without the backsolve. Their
            ``lambda2 = l2 * n / 2`` on raw gradients is the same problem as ours ``l2/2`` on G/sqrt(n).
            Each code's l2 is chosen on the validation split (ours: l2 and backsolve), never on test.
  CHITA++   at each sparsity: ``--stages`` stages on the authors' schedule ``generate_schedule(stages,
            --base-level, sparsity, --schedule)``, each code at its single-stage choice: the authors'
            ``MultiStagePruner``; ours ``chita`` once per stage at those sparsities (which is what
            ``chita_plus_plus(..., schedule=those sparsities)`` runs). Per stage: kept weights, dead
            (zero-gradient) columns at the stage's start, objective, validation and test accuracy,
            support overlap with the authors' stage; and ours solving the authors' stage problem
            itself (same inputs: their weights, their gradients, their l2), with and without backsolve.

Objective: ``Q = 1/2 ||X_L w_L - y||^2 + l2/2 ||w_L - w0_L||^2``, X = G / sqrt(n), over the live
(non-zero) columns L: the authors' problem, and ours with ``prune_dead`` (the default), in float64.
The authors' objective is n times this.

Timing: the two codes run interleaved in one process (per sparsity and l2: authors, ours, ours
without backsolve), so a shared machine slows both alike; single stage: the solve only (the
gradients are given to both); CHITA++: the stages' calls, gradient collection included (the
authors' MultiStagePruner also evaluates and counts FLOPs between stages: not timed). Numba's
compilation is warmed up first. Results: ``<out-dir>/chita_vs_authors_<name>_<device>.json`` and ``.md``
(``--name``, default fashion_mnist; default out-dir bench/results; ``--quick``: a temporary directory).
"""
import argparse
import contextlib
import copy
import io
import json
import math
import re
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from record import command_line, results_dir, run_metadata

from sparse_engine import sparsify
from sparse_engine.pruning import chita, chita_objective, chita_solve, target_kept
from sparse_engine.second_order_demo import prepare_data, train_dense
from sparse_engine.train import evaluate

AUTHORS_FILES = ("CHITA_opt/L0_card_const.py", "pruners/CHITA.py", "pruners/multi_stage_pruner.py",
                 "utils/main_utils.py")
DEMO_HIDDEN = (40, 20)  # second_order_mlp's hidden widths


def build_mlp(hidden) -> nn.Module:
    """784-hidden-10, no biases, ReLU: the demo's ``second_order_mlp`` for the default widths (the same
    modules in the same order, so the same initialization under one seed)."""
    widths, layers = (784, *hidden, 10), [nn.Flatten()]
    for i in range(len(widths) - 1):
        layers += [nn.Linear(widths[i], widths[i + 1], bias=False)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
    return nn.Sequential(*layers)


def weight_names(model: nn.Module) -> list[str]:
    """The MLP's weights, the parameters both codes prune ("1.weight", "3.weight", ...)."""
    return [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)]


# ---- the authors' code ---------------------------------------------------------------------------

def import_authors(path: Path) -> types.SimpleNamespace:
    """Their CHITA pruner, MultiStagePruner and generate_schedule, imported from the checkout."""
    missing = [f for f in AUTHORS_FILES if not (path / f).is_file()]
    if missing:
        raise SystemExit(f"error: --authors {path}: not a checkout of mazumder-lab/CHITA "
                         f"(missing {', '.join(missing)})")
    for module in ("numba", "sklearn"):
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"error: the authors' code needs {module}: pip install numba scikit-learn")
    try:
        import torchvision  # noqa: F401
    except ImportError:  # only their data sets and ImageNet models use it: stand-ins for the imports
        tv = types.ModuleType("torchvision")
        for sub in ("datasets", "transforms", "models"):
            setattr(tv, sub, types.ModuleType(f"torchvision.{sub}"))
            sys.modules[f"torchvision.{sub}"] = getattr(tv, sub)
        tv.models.resnet50 = None
        sys.modules["torchvision"] = tv
    sys.path.insert(0, str(path))
    from pruners.CHITA import CHITA
    from pruners.multi_stage_pruner import MultiStagePruner
    from utils.main_utils import generate_schedule
    from CHITA_opt.L0_card_const import Active_IHTCDLS_PP
    return types.SimpleNamespace(CHITA=CHITA, MultiStagePruner=MultiStagePruner, generate_schedule=generate_schedule,
                                 solver=Active_IHTCDLS_PP)


def authors_pruner(authors, model: nn.Module, loader, n: int, l2: float, iters: int):
    """Their pruner as their run_experiment.py builds it for Active_IHTCDLS: block size -1, no
    first-order term, fisher_mini_bsz 1 (per-sample gradients)."""
    return authors.CHITA(model, weight_names(model), loader, n, 1, F.cross_entropy, -1, l2, iters, False, False, "cpu",
                         "Active_IHTCDLS")


def quiet():
    return contextlib.redirect_stdout(io.StringIO())  # their code prints every search step


# ---- shared helpers -----------------------------------------------------------------------------

def flat_weights(model: nn.Module) -> torch.Tensor:
    state = model.state_dict()
    return torch.cat([state[p].detach().reshape(-1).float().cpu() for p in weight_names(model)])


def with_weights(dense: nn.Module, w) -> nn.Module:
    model = copy.deepcopy(dense).cpu()
    w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).float()
    state, i = model.state_dict(), 0
    for p in weight_names(model):
        count = state[p].numel()
        state[p] = w[i:i + count].reshape(state[p].shape)
        i += count
    model.load_state_dict(state)
    return model


def per_sample_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, p) float32 gradients of each sample's loss at the model's weights, eval mode."""
    model = copy.deepcopy(model).cpu().eval()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(ps, xi, yi):
        return F.cross_entropy(torch.func.functional_call(model, ps, (xi[None],)), yi[None])

    g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x.cpu(), y.cpu())
    return torch.cat([g[p].reshape(x.shape[0], -1) for p in weight_names(model)], 1)


def objective(G: torch.Tensor, w, w0: torch.Tensor, l2: float) -> float:
    """Q over the live columns (module docstring), float64."""
    X = G.double() / math.sqrt(G.shape[0])
    live = G.ne(0).any(0)
    w = torch.as_tensor(np.asarray(w) if not isinstance(w, torch.Tensor) else w).double()
    return float(chita_objective(X[:, live], w[live], w0.double()[live], l2))


def accuracies(dense: nn.Module, w, data: dict) -> dict:
    model = with_weights(dense, w)
    return dict(val_acc=evaluate(model, *data["val"]), test_acc=evaluate(model, *data["test"]))


def overlap(w_a, w_b) -> float:
    """|S_a & S_b| / |S_b|: the share of b's kept weights that a keeps too."""
    a, b = torch.as_tensor(np.asarray(w_a) != 0), torch.as_tensor(np.asarray(w_b) != 0)
    return float((a & b).sum()) / max(1, int(b.sum()))


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def warm_up(authors) -> None:
    """Numba compiles on the first call: compile before anything is timed (ours: the first call's
    allocations)."""
    g = np.random.default_rng(0)
    X, w = g.standard_normal((20, 60)), g.standard_normal(60)
    with quiet():
        authors.solver(X @ w, X, w, 10, alpha=np.zeros(60), lambda1=0, lambda2=1.0, M=np.inf, beta_tilde1=np.zeros(60),
                       beta_tilde2=w.copy(), L=None, iht_max_itr=5, ftol=1e-7, act_max_itr=5, buget=None, kimp=1.5,
                       act_itr=1, cd_itr=0, ctol=1e-4, sea1_max_itr=5, sea2_max_itr=10)
    Xt = torch.from_numpy(X).float()
    chita_solve(Xt, torch.from_numpy(w).float(), 10, 1.0)


# ---- single stage -------------------------------------------------------------------------------

def single_stage(authors, dense: nn.Module, data: dict, G: torch.Tensor, s: float, l2: float, args) -> list[dict]:
    """One sparsity and l2: the authors' solve, then ours with and without the backsolve."""
    n, w0 = G.shape[0], flat_weights(dense)
    X = G / math.sqrt(n)
    k = target_kept(w0.numel(), s)
    pruner = authors_pruner(authors, copy.deepcopy(dense).cpu(), None, n, l2, args.iht_iters)
    with quiet():
        (w_a, _), t_a = timed(lambda: pruner.prune(None, s, grads=G.double().numpy()))
    rows = [dict(code="authors", sparsity=s, l2=l2, backsolve=False, kept=int((w_a != 0).sum()), seconds=t_a,
                 solver_seconds=pruner.results["prun_runtime"], objective=objective(G, w_a, w0, l2),
                 **accuracies(dense, w_a, data))]
    for backsolve in (True, False):
        (w, keep), t = timed(lambda: chita_solve(X.to(args.device), w0.to(args.device), k, l2, iters=args.iht_iters,
                                                 backsolve=backsolve))
        w = w.cpu()
        rows.append(dict(code="ours", sparsity=s, l2=l2, backsolve=backsolve, kept=int(keep.sum()), seconds=t,
                         objective=objective(G, w, w0, l2), overlap_with_authors=overlap(w, w_a),
                         **accuracies(dense, w, data)))
    return rows


def choose(rows: list[dict]) -> dict:
    """The row of best validation accuracy (ties: the smaller l2, then the backsolve)."""
    return max(rows, key=lambda r: (r["val_acc"], -r["l2"], r["backsolve"]))


# ---- CHITA++ --------------------------------------------------------------------------------------

def stage_rows(dense, data, weights: list, sparsities: list, l2: float, times: list) -> list[dict]:
    """Per stage: the problem at the stage's starting weights, and what the stage left."""
    x, y = data["grads"][0]
    rows = []
    for i, s in enumerate(sparsities):
        G = per_sample_gradients(with_weights(dense, weights[i]), x, y)
        rows.append(dict(stage=i + 1, sparsity=s, kept=int((weights[i + 1] != 0).sum()),
                         dead_columns=int((~G.ne(0).any(0)).sum()), seconds=times[i],
                         objective=objective(G, weights[i + 1], weights[i], l2),
                         **accuracies(dense, weights[i + 1], data)))
    return rows


def chita_pp(authors, dense: nn.Module, data: dict, s: float, choice_a: dict, choice_o: dict, args) -> dict:
    """Both CHITA++ runs at sparsity s, their per-stage records, and ours on the authors' stage problems."""
    sparsities = [float(v) for v in authors.generate_schedule(args.stages, args.base_level, s, args.schedule)]
    sparsities[-1] = s  # their exp schedule ends at s up to rounding
    x, y = data["grads"][0]
    n = x.shape[0]

    # The authors: their MultiStagePruner; a DataLoader over the same n images, one per batch.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.cpu(), y.cpu()), batch_size=1)
    val_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*data["val"]), batch_size=1000)
    pruner = authors_pruner(authors, copy.deepcopy(dense).cpu(), loader, n, choice_a["l2"], args.iht_iters)
    multi = authors.MultiStagePruner(pruner, val_loader, args.schedule, args.stages)
    w_auth, t_auth, solver_s = [flat_weights(dense)], [], []
    prune, update = pruner.prune, pruner.update_model

    def timed_prune(*a, **kw):
        out, t = timed(lambda: prune(*a, **kw))
        t_auth.append(t)
        solver_s.append(pruner.results["prun_runtime"])
        return out

    def recorded_update(w):
        w_auth.append(torch.from_numpy(np.asarray(w)).float().clone())
        update(w)

    pruner.prune, pruner.update_model = timed_prune, recorded_update
    with quiet():
        multi.prune(torch.ones(w_auth[0].numel(), dtype=torch.bool), s, args.base_level)
    if [round(v, 12) for v in sparsities] != [round(float(r["sparsity"]), 12) for r in multi.results]:
        raise RuntimeError("the authors' stages ran at other sparsities than generate_schedule's")

    # Ours: chita at each of those sparsities (= chita_plus_plus with schedule=sparsities).
    model = sparsify(copy.deepcopy(dense)).to(args.device)
    w_ours, t_ours = [flat_weights(dense)], []
    for stage_s in sparsities:
        _, t = timed(lambda: chita(model, F.cross_entropy, data["grads"], stage_s, n_grads=n, l2=choice_o["l2"],
                                   iht_iters=args.iht_iters, backsolve=choice_o["backsolve"]))
        t_ours.append(t)
        w_ours.append(torch.cat([m.weight.detach().reshape(-1).float().cpu()
                                 for m in model if hasattr(m, "mask")]))

    auth_rows = stage_rows(dense, data, w_auth, sparsities, choice_a["l2"], t_auth)
    ours_rows = stage_rows(dense, data, w_ours, sparsities, choice_o["l2"], t_ours)
    for i, (ra, ro) in enumerate(zip(auth_rows, ours_rows)):
        ra["solver_seconds"] = solver_s[i]
        ro["overlap_with_authors"] = overlap(w_ours[i + 1], w_auth[i + 1])
        # Same inputs: ours on the authors' stage problem (their weights, gradients and l2).
        G = per_sample_gradients(with_weights(dense, w_auth[i]), x, y)
        k = target_kept(G.shape[1], sparsities[i])
        ra["ours_on_this_problem"] = {}
        for backsolve in (True, False):
            w, _ = chita_solve(G / math.sqrt(n), w_auth[i], k, choice_a["l2"], iters=args.iht_iters,
                               backsolve=backsolve)
            ra["ours_on_this_problem"]["backsolve" if backsolve else "no_backsolve"] = dict(
                objective=objective(G, w, w_auth[i], choice_a["l2"]), overlap_with_authors=overlap(w, w_auth[i + 1]),
                **accuracies(dense, w, data))
    return dict(sparsity=s, schedule=sparsities, authors=dict(l2=choice_a["l2"], seconds=sum(t_auth), stages=auth_rows),
                ours=dict(l2=choice_o["l2"], backsolve=choice_o["backsolve"], seconds=sum(t_ours), stages=ours_rows))


# ---- report ---------------------------------------------------------------------------------------

LABELS = {"authors": "authors", "ours": "ours (l2, backsolve chosen)", "ours_default": "ours (backsolve on)"}


def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def on_off(flag: bool) -> str:
    return "on" if flag else "off"


def markdown(result: dict) -> str:
    meta, single, chosen, multi = result["meta"], result["single"], result["chosen"], result["chita_pp"]
    a = meta["args"]
    hidden = tuple(a.get("hidden", DEMO_HIDDEN))
    shape = "-".join(map(str, (784, *hidden, 10)))
    arch = f"the second-order demo's MLP {shape}" if hidden == DEMO_HIDDEN else f"the MLP {shape}"
    lines = [f"# CHITA: this library against the authors' code (mazumder-lab/CHITA), side by side", "",
             f"Fashion-MNIST, {arch} (no bias, {meta['weights']} weights), dense "
             f"{pct(meta['dense']['test_acc'])}% test ({a['epochs']} epochs, seed {a['seed']}); n = {a['n_grads']} "
             f"per-sample gradients (the same for both), {a['iht_iters']} iterations; l2 chosen per code on a "
             f"{meta['val_size']}-image validation split from {a['l2']}; objective Q on the live columns (our scale; "
             f"the authors' is n times it). {meta['device']} ({meta['cpu_threads']} threads), torch {meta['torch']}, "
             f"numba {meta['numba']}, {meta['date']}, git {meta['git_sha']}. **Timings are from a shared 2-core "
             f"machine (other jobs running): contended, provisional; the two codes ran interleaved, so their ratio "
             f"is fairer than either figure.**", "", f"`{meta['command']}`", "",
             "## Single stage (one CHITA solve on the dense model's gradients)", "",
             "Chosen on validation (test shown for the chosen run only):", "",
             "| sparsity | code | l2 | backsolve | kept | Q | val % | test % | solve s |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for s in a["sparsities"]:
        for name in ("authors", "ours", "ours_default"):
            r = chosen[f"{s}"][name]
            label = LABELS[name]
            lines.append(f"| {100 * s:g}% | {label} | {r['l2']:g} | {on_off(r['backsolve'])} | {r['kept']} | "
                         f"{r['objective']:.4g} | {pct(r['val_acc'])} | {pct(r['test_acc'])} | {r['seconds']:.1f} |")
    lines += ["", "Every l2 (Q / validation % / solve s; authors, ours backsolve on, ours backsolve off), and the "
              "support overlap of ours (on) with the authors':", "",
              "| sparsity | l2 | authors | ours, backsolve | ours, no backsolve | overlap | time ratio authors/ours |",
              "|---|---:|---|---|---|---:|---:|"]
    for s in a["sparsities"]:
        for l2 in a["l2"]:
            rows = {(r["code"], r["backsolve"]): r for r in single if r["sparsity"] == s and r["l2"] == l2}
            ra, ro, rn = rows["authors", False], rows["ours", True], rows["ours", False]
            cell = lambda r: f"{r['objective']:.4g} / {pct(r['val_acc'])} / {r['seconds']:.1f}"  # noqa: E731
            lines.append(f"| {100 * s:g}% | {l2:g} | {cell(ra)} | {cell(ro)} | {cell(rn)} | "
                         f"{100 * ro['overlap_with_authors']:.1f}% | {ra['seconds'] / ro['seconds']:.2f} |")
    tot_a = sum(r["seconds"] for r in single if r["code"] == "authors")
    tot_o = sum(r["seconds"] for r in single if r["code"] == "ours" and r["backsolve"])
    lines += ["", f"All single-stage solves: authors {tot_a:.0f} s, ours (backsolve on) {tot_o:.0f} s: ratio "
              f"{tot_a / tot_o:.2f} (contended).", "",
              f"## CHITA++ ({a['stages']} stages, the authors' '{a['schedule']}' schedule from base level "
              f"{a['base_level']})", "",
              "| sparsity | code | l2 | backsolve | test % | val % | time s |", "|---|---|---:|---|---:|---:|---:|"]
    for m in multi:
        for name in ("authors", "ours"):
            r = m[name]
            last = r["stages"][-1]
            lines.append(f"| {100 * m['sparsity']:g}% | {name} | {r['l2']:g} | "
                         f"{on_off(name != 'authors' and r['backsolve'])} | {pct(last['test_acc'])} | "
                         f"{pct(last['val_acc'])} | {r['seconds']:.0f} |")
    for m in multi:
        lines += ["", f"Stage by stage at {100 * m['sparsity']:g}% (Q of each code on its own stage problem; "
                  "'ours on theirs': our solver on the authors' stage problem, same weights, gradients and l2, "
                  "backsolve on / off):", "",
                  "| stage | sparsity | dead cols (a / o) | Q authors | Q ours | test % authors | test % ours | "
                  "overlap | ours on theirs: Q | val % (a / on / off) |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---|---|"]
        for ra, ro in zip(m["authors"]["stages"], m["ours"]["stages"]):
            on, off = ra["ours_on_this_problem"]["backsolve"], ra["ours_on_this_problem"]["no_backsolve"]
            lines.append(f"| {ra['stage']} | {100 * ra['sparsity']:.2f}% | {ra['dead_columns']} / "
                         f"{ro['dead_columns']} | {ra['objective']:.4g} | {ro['objective']:.4g} | "
                         f"{pct(ra['test_acc'])} | {pct(ro['test_acc'])} | "
                         f"{100 * ro['overlap_with_authors']:.1f}% | {on['objective']:.4g} / {off['objective']:.4g} | "
                         f"{pct(ra['val_acc'])} / {pct(on['val_acc'])} / {pct(off['val_acc'])} |")
    t_a = sum(m["authors"]["seconds"] for m in multi)
    t_o = sum(m["ours"]["seconds"] for m in multi)
    if multi:
        lines += ["", f"All CHITA++ runs (gradients included): authors {t_a:.0f} s, ours {t_o:.0f} s: ratio "
                  f"{t_a / t_o:.2f} (contended)."]
    return "\n".join(lines) + "\n"


# ---- main -----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--authors", type=Path, help="path of a local checkout of github mazumder-lab/CHITA (required)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST IDX files (default: the demo's)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where ours runs (the authors' code runs on the CPU: its solver is numba)")
    p.add_argument("--out-dir", type=Path, help="default: bench/results (with --quick, a fresh temporary directory)")
    p.add_argument("--quick", action="store_true", help="small data, one sparsity, one l2, 2 stages: the smoke test")
    p.add_argument("--threads", type=int, help="CPU threads of torch (default: torch's)")
    p.add_argument("--checkpoint", type=Path, help="the dense model's state dict: loaded if it exists, else written")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.95, 0.98])
    p.add_argument("--l2", type=float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4])
    p.add_argument("--stages", type=int, default=5, help="CHITA++ stages (0: none)")
    p.add_argument("--schedule", default="exp", choices=("exp", "poly", "linear", "const", "MFAC"),
                   help="the authors' generate_schedule name")
    p.add_argument("--base-level", type=float, default=0.1, help="the authors' base_level: the first stage's sparsity")
    p.add_argument("--n-grads", type=int, default=1000)
    p.add_argument("--iht-iters", type=int, default=100, help="theirs num_iterations, ours iht_iters")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--hidden", type=int, nargs="+", default=list(DEMO_HIDDEN),
                   help="the MLP's hidden widths (784-hidden-10, no biases; default: the demo's 40 20)")
    p.add_argument("--name", default="fashion_mnist",
                   help="the results' name: <out-dir>/chita_vs_authors_<name>_<device>.json and .md")
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--val-size", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.authors is None:
        p.error("--authors: the path of a local checkout of github mazumder-lab/CHITA is required (this repository "
                "neither includes nor fetches the authors' code)")
    if args.quick:
        args.sparsities, args.l2, args.stages, args.n_grads = args.sparsities[-1:], args.l2[:1], min(args.stages, 2), 64
        args.iht_iters, args.epochs, args.train_size, args.val_size = 10, 1, 3000, 500
    if not all(0.0 < s < 1.0 for s in args.sparsities) or not all(v > 0 for v in args.l2):
        p.error("--sparsities must lie in (0, 1) and --l2 be > 0")
    if args.stages < 0 or args.n_grads < 1 or args.val_size < 1:
        p.error("--stages must be >= 0, --n-grads and --val-size >= 1")
    if not all(h >= 1 for h in args.hidden):
        p.error(f"--hidden: expected widths >= 1, got {args.hidden}")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", args.name):
        p.error(f"--name: expected letters, digits, '_', '.' or '-' (a file name), got {args.name!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    authors = import_authors(args.authors.resolve())
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = prepare_data(args)
    data["grads"] = [(x.cpu(), y.cpu()) for x, y in data["grads"]]  # both codes read the same images
    torch.manual_seed(args.seed)
    dense = build_mlp(args.hidden)
    if args.checkpoint is not None and args.checkpoint.exists():
        dense.load_state_dict(torch.load(args.checkpoint))
    else:
        class Bar:
            def set_postfix(self, **kw):
                pass
        train_dense(dense, *data["train"], args.epochs, argparse.Namespace(seed=args.seed, device="cpu"), Bar())
        if args.checkpoint is not None:
            torch.save(dense.state_dict(), args.checkpoint)
    dense.eval()
    if args.device == "cuda":
        data["grads"] = [(x.cuda(), y.cuda()) for x, y in data["grads"]]
    warm_up(authors)
    G = per_sample_gradients(dense, *[t.cpu() for t in data["grads"][0]])

    single, chosen, multi = [], {}, []
    for s in args.sparsities:
        rows = []
        for l2 in args.l2:
            rows += single_stage(authors, dense, data, G, s, l2, args)
            print(f"single {s:g} l2={l2:g}: " + ", ".join(
                f"{r['code']} backsolve {on_off(r['backsolve'])}: val {r['val_acc']:.4f} Q {r['objective']:.4g} "
                f"{r['seconds']:.1f}s" for r in rows[-3:]), flush=True)
        single += rows
        chosen[f"{s}"] = dict(authors=choose([r for r in rows if r["code"] == "authors"]),
                              ours=choose([r for r in rows if r["code"] == "ours"]),
                              ours_default=choose([r for r in rows if r["code"] == "ours" and r["backsolve"]]))
    if args.stages:
        for s in args.sparsities:
            multi.append(chita_pp(authors, dense, data, s, chosen[f"{s}"]["authors"], chosen[f"{s}"]["ours"], args))
            print(f"CHITA++ {s:g}: authors test {multi[-1]['authors']['stages'][-1]['test_acc']:.4f} "
                  f"({multi[-1]['authors']['seconds']:.0f}s), ours {multi[-1]['ours']['stages'][-1]['test_acc']:.4f} "
                  f"({multi[-1]['ours']['seconds']:.0f}s)", flush=True)

    import numba
    meta = dict(run_metadata(torch.device(args.device)), numba=numba.__version__, numpy=np.__version__,
                command=command_line("compare_chita_authors.py", argv),
                args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("authors", "out_dir", "data_dir", "checkpoint")},
                weights=int(G.shape[1]), val_size=int(data["val"][0].shape[0]),
                dense=dict(val_acc=evaluate(dense, *data["val"]), test_acc=evaluate(dense, *data["test"])),
                total_seconds=time.perf_counter() - t_start)
    meta["command"] = meta["command"].replace(str(args.authors), "<authors checkout>")
    if args.checkpoint is not None:
        meta["command"] = meta["command"].replace(str(args.checkpoint), "<dense checkpoint>")
    result = dict(meta=meta, single=single, chosen=chosen, chita_pp=multi)
    out = results_dir(args.out_dir, args.quick, "chita_vs_authors")
    out.mkdir(parents=True, exist_ok=True)
    name = f"chita_vs_authors_{args.name}_{args.device}"
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    (out / f"{name}.md").write_text(text)
    print("\n" + text + f"\nwrote {out / name}.json and .md")
    return result


if __name__ == "__main__":
    main()
