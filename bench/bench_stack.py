"""Training throughput of K stacked sparse models against the same K models trained one after another.

For the demo's MLP (784-300-100-10) and CNN (sparse_engine.models) on Fashion-MNIST-shaped batches
(B x 1 x 28 x 28, 10 classes), and the zoo's LSTM classifier (embedding 64, two LSTM layers of 128,
B x 32 tokens; its stacked LSTM layers run whichever of their two implementations dispatch measures
faster, see sparse_engine.stack.recurrent) and transformer (d_model 128, 4 heads, 2 pre-norm encoder
layers, B x 32 tokens; dropout 0.1, independent per model), K sparse models with different masks (sparsity 0.5 to 0.95) and
different learning rates, SGD with momentum 0.9. One measured step of

  sequential   the K models one after another, as a sweep runs them today: per model zero_grad,
               forward, cross-entropy, backward, torch.optim.SGD step (with mask_optimizer's hooks)
  stacked      stack(models): one zero_grad, one forward of the (K, B, ...) batch, the K models'
               losses summed, one backward, one StackedSGD step (per-model learning rates, with
               mask_stacked_optimizer's hooks)

trains each of the K models once on its own batch: model-steps/s = K / (seconds per step).

The bound of stacking on the device, with no masks at all, in the same run (--no-dense skips it):

  dense sequential   the K models dense (plain torch modules), one after another, SGD as above
  dense vmap         the K dense models as PyTorch's model-ensembling recipe stacks them:
                     torch.func.stack_module_state + vmap(grad(functional_call)), then SGD with
                     momentum and per-model learning rates on the stacked tensors (BatchNorm with
                     replace_all_batch_norm_modules_: batch statistics, no running ones, which vmap
                     cannot update in place)

If the dense vmap stack is not faster than the dense models one after another, no masked stack can
be: the step is bound by the models' arithmetic, not by per-model overhead. (For the LSTM, vmap has no
batching rule for torch's fused recurrent kernel and falls back to a loop over the models: there the
dense vmap column is that fallback, not a bound.)

The
two are timed in interleaved rounds (a slow spell of a shared machine hits both alike), medians
after warm-up; peak memory is that of one step (resident memory on CPU, the caching allocator's
peak on CUDA), beyond what the models and optimizer state already hold. Before timing, a guard
(exit status 1, nothing written) checks that one stacked step and one sequential step give the
same weights.

  python bench/bench_stack.py --device cpu                 # K = 1, 2, 4, 8, 16, 32, batch 128
  python bench/bench_stack.py --device cpu --quick --out-dir /tmp/s   # smoke test: K = 1, 4, batch 16

Results: one JSON line per (model, K, method) appended to <out-dir>/stack_<device>.jsonl, and the
run's table rewritten to <out-dir>/stack_<device>.md (a run of some of the models: stack_<models>_<device>).

  python bench/bench_stack.py --device cpu --models lstm --ks 1 2 4 8 16   # -> stack_lstm_cpu-<cpu>.md
"""
import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

from record import (add_run_arguments, check_run_arguments, command_line, device_slug, markdown_table, results_dir,
                    run_metadata, write_results)
from timing import cpu_peak_bytes, cuda_peak_bytes, interleaved_ms

from sparse_engine import mask_optimizer, sparse_modules, sparsify
from sparse_engine.models import fashion_cnn, fashion_mlp, lstm, transformer
from sparse_engine.stack import stack
from sparse_engine.stack.optim import StackedSGD, mask_stacked_optimizer

BENCH = "stack"
MODELS = {"mlp": fashion_mlp, "cnn": fashion_cnn, "lstm": lstm, "transformer": transformer}
SEQUENCE = 32  # tokens per example of the LSTM and transformer (the zoo defaults: vocabulary 1000, 10 classes)


def inputs(model: str, k: int, batch: int, g: torch.Generator) -> torch.Tensor:
    """K batches of the model's inputs: Fashion-MNIST-shaped images, or token sequences for the LSTM."""
    if model in ("lstm", "transformer"):
        return torch.randint(0, 1000, (k, batch, SEQUENCE), generator=g)
    return torch.randn(k, batch, 1, 28, 28, generator=g)
KS, QUICK_KS = (1, 2, 4, 8, 16, 32), (1, 4)
ROUNDS, REPS = 3, 3


class Case:
    """K sparse models trained one after another, and their stack, each with its batches."""

    def __init__(self, model: str, k: int, batch: int, device: torch.device, seed: int):
        self.model_name = model
        g = torch.Generator().manual_seed(seed)
        self.models = []
        for i in range(k):
            torch.manual_seed(seed + i)
            m = sparsify(MODELS[model]()).to(device)
            sparsity = 0.5 + 0.45 * i / max(k - 1, 1)
            for _, unit in sparse_modules(m):
                unit.set_mask((torch.rand(unit.weight.shape, generator=g) >= sparsity).to(device))
            self.models.append(m)
        self.lrs = [0.01 * (1 + i % 4) for i in range(k)]
        self.stacked = stack(self.models)
        self.opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m, lr in zip(self.models, self.lrs)]
        for m, o in zip(self.models, self.opts):
            mask_optimizer(o, m)
        self.stacked_opt = StackedSGD(self.stacked, lr=self.lrs, momentum=0.9)
        mask_stacked_optimizer(self.stacked_opt, self.stacked)
        self.batches = [(inputs(model, k, batch, g).to(device),
                         torch.randint(0, 10, (k, batch), generator=g).to(device)) for _ in range(2)]

    def dense_bound(self, lrs: list, device: torch.device) -> None:
        """The K models' dense copies (before masking) for the dense sequential and dense vmap steps."""
        self.dense = [MODELS[self.model_name]().to(device) for _ in self.models]
        for d, m in zip(self.dense, self.models):
            d.load_state_dict({n: t for n, t in m.state_dict().items() if not n.endswith("mask_bits")}, strict=False)
        self.dense_opts = [torch.optim.SGD(d.parameters(), lr=lr, momentum=0.9) for d, lr in zip(self.dense, lrs)]
        self.params, self.buffers = torch.func.stack_module_state(self.dense)
        self.base = copy.deepcopy(self.dense[0]).to("meta")
        torch.func.replace_all_batch_norm_modules_(self.base)
        shape = lambda t: (len(lrs),) + (1,) * (t.dim() - 1)
        self.vmap_lrs = {n: torch.tensor(lrs, device=device).reshape(shape(t)) for n, t in self.params.items()}
        self.momentum = {n: torch.zeros_like(t) for n, t in self.params.items()}

        def loss(params, buffers, x, y):
            return F.cross_entropy(torch.func.functional_call(self.base, (params, buffers), (x,)), y)

        self.vmap_grad = torch.func.vmap(torch.func.grad(loss), randomness="different")  # dropout per model

    def dense_sequential(self, i: int) -> None:
        x, y = self.batches[i % 2]
        for k, (m, o) in enumerate(zip(self.dense, self.dense_opts)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[k]), y[k]).backward()
            o.step()

    @torch.no_grad()
    def dense_vmap(self, i: int) -> None:
        x, y = self.batches[i % 2]
        with torch.enable_grad():
            grads = self.vmap_grad(self.params, self.buffers, x, y)
        for n, p in self.params.items():
            buf = self.momentum[n].mul_(0.9).add_(grads[n])
            p.sub_(self.vmap_lrs[n] * buf)

    def sequential(self, i: int) -> None:
        x, y = self.batches[i % 2]
        for k, (m, o) in enumerate(zip(self.models, self.opts)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x[k]), y[k]).backward()
            o.step()

    def stacked_step(self, i: int) -> None:
        x, y = self.batches[i % 2]
        self.stacked_opt.zero_grad(set_to_none=True)
        out = self.stacked(x)
        # the mean over each model's batch, summed over models: model k's gradient is its own loss's
        F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum").div(x.shape[1]).backward()
        self.stacked_opt.step()


def guard(device: torch.device) -> None:
    """One stacked step == one sequential step (weights after it), else exit 1 before anything is timed."""
    case = Case("cnn", 3, 8, device, seed=123)
    case.sequential(0)
    case.stacked_step(0)
    for k, m in enumerate(case.models):
        for n, p in m.named_parameters():
            q = case.stacked.get_parameter(f"module.{n}")[k]
            if not torch.allclose(p, q, rtol=1e-4, atol=1e-5):
                sys.exit(f"CORRECTNESS GUARD FAILED: model {k}, {n}: the stacked step differs from the sequential one "
                         f"by {(p - q).abs().max().item():.3g}")


def peak_bytes(fn, device: torch.device) -> int:
    return cuda_peak_bytes(fn) if device.type == "cuda" else cpu_peak_bytes(fn)


def bench_case(model: str, k: int, batch: int, device: torch.device, args, meta: dict) -> list[dict]:
    case = Case(model, k, batch, device, args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    methods = {"sequential": (case.sequential, 2, None), "stacked": (case.stacked_step, 2, None)}
    if args.dense:
        case.dense_bound(case.lrs, device)
        methods.update({"dense sequential": (case.dense_sequential, 2, None),
                        "dense vmap": (case.dense_vmap, 2, None)})
    times = interleaved_ms(methods, meta["rounds"], meta["reps"], sync=sync)
    peaks = {name: peak_bytes(lambda: step(0), device) for name, (step, _, _) in methods.items()}
    rows = []
    for name, t in times.items():
        rows.append(dict(meta, model=model, k=k, batch=batch, method=name, ms=t.median, ms_p20=t.p20, ms_p80=t.p80,
                         model_steps_per_s=k / t.median * 1e3, peak_bytes=peaks[name],
                         speedup=(times["dense sequential" if name.startswith("dense") else "sequential"].median
                                  / t.median)))
    return rows


def markdown(rows: list[dict], meta: dict, command: str) -> str:
    by = {(r["model"], r["k"], r["method"]): r for r in rows}
    keys = sorted({(r["model"], r["k"]) for r in rows}, key=lambda mk: (list(MODELS).index(mk[0]), mk[1]))
    table = [dict(model=m, k=k, seq=by[m, k, "sequential"], st=by[m, k, "stacked"]) for m, k in keys]
    mib = lambda b: f"{b / 2**20:.1f}"
    columns = [("model", lambda r: r["model"]), ("K", lambda r: str(r["k"])),
               ("sequential ms/step", lambda r: f"{r['seq']['ms']:.2f}"),
               ("stacked ms/step", lambda r: f"{r['st']['ms']:.2f}"),
               ("sequential model-steps/s", lambda r: f"{r['seq']['model_steps_per_s']:.0f}"),
               ("stacked model-steps/s", lambda r: f"{r['st']['model_steps_per_s']:.0f}"),
               ("speedup", lambda r: f"{r['st']['speedup']:.2f}x"),
               ("peak MiB sequential", lambda r: mib(r["seq"]["peak_bytes"])),
               ("peak MiB stacked", lambda r: mib(r["st"]["peak_bytes"]))]
    if any(r["method"] == "dense vmap" for r in rows):
        for r in table:
            r["dvmap"] = by[r["model"], r["k"], "dense vmap"]
            r["dseq"] = by[r["model"], r["k"], "dense sequential"]
        columns += [("dense sequential ms/step", lambda r: f"{r['dseq']['ms']:.2f}"),
                    ("dense vmap ms/step", lambda r: f"{r['dvmap']['ms']:.2f}"),
                    ("dense vmap speedup (the bound)", lambda r: f"{r['dvmap']['speedup']:.2f}x")]
    head = (f"# Stacked training vs one model after another\n\n`{command}`\n\n"
            f"{meta['device']} ({meta['cpu_threads']} torch threads, load {meta['load_avg_1min']:.2f} at start), "
            f"torch {meta['torch']}, git {meta['git_sha']}, {meta['date']}; batch {rows[0]['batch']} per model, "
            f"medians of {meta['rounds']} interleaved rounds of {meta['reps']} steps\n\n")
    return head + markdown_table(table, columns) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p, quick="K = 1 and 4, batch 16")
    p.add_argument("--batch", type=int, help="batch per model (default 128; 16 with --quick)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--ks", nargs="+", type=int, help=f"stack sizes (default {KS}; {QUICK_KS} with --quick)")
    p.add_argument("--no-dense", dest="dense", action="store_false",
                   help="skip the dense bound (dense models one after another vs a torch.func vmap stack)")
    args = p.parse_args(argv)
    check_run_arguments(p, args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batch = args.batch or (16 if args.quick else 128)
    ks = args.ks or (QUICK_KS if args.quick else KS)
    if batch < 1 or min(ks) < 1:
        p.error("--batch and --ks: expected positive counts")
    guard(device)
    out_dir = results_dir(args.out_dir, args.quick, BENCH)
    meta = run_metadata(device)
    meta.update(quick=args.quick, load_avg_1min=os.getloadavg()[0], cpu_count=os.cpu_count(),
                rounds=1 if args.quick else ROUNDS, reps=2 if args.quick else REPS, timer="perf_counter")
    rows = []
    for model in args.models:
        for k in ks:
            print(f"{model} K={k} ...", flush=True)
            rows += bench_case(model, k, batch, device, args, meta)
    # a run of some of the models writes its own files (stack_lstm_<device>.md), not over the full table
    name = BENCH if list(args.models) == list(MODELS) else "_".join([BENCH] + list(args.models))
    write_results(out_dir, f"{name}_{device_slug(device)}", rows, markdown(rows, meta, command_line("bench_stack.py",
                                                                                                   argv)))


if __name__ == "__main__":
    main()
