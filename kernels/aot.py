"""Ahead-of-time compile gate for the Triton kernels: registers, spills and shared memory without a GPU.

Every kernel of ``sparse_engine.kernels`` is compiled for sm_90a and sm_80 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (Triton's bundled LLVM and
ptxas; no device, no driver), for every autotune config its launcher can reach and each dtype it
accepts. Resources come from Triton's own ptxas run with ``-v`` on the PTX Triton produced
(registers a thread, bytes of spill stores, static shared memory) plus Triton's dynamic shared
memory (``metadata.shared``). A variant fails on a compile error, any spill, or shared memory over the
architecture's per-block limit (sm_90: 227 KiB, sm_80: 163 KiB). It also checks, in the compiled
IR, that the strides which can make offsets pass 2**31 (transposed views, large images) are widened
to int64 before they multiply (narrow_offsets).

Each kernel is compiled for the specialisation a contiguous launch gets: 16-byte aligned pointers,
unit inner strides as the constant 1 (Triton specialises ints equal to 1), and sizes and row
strides divisible by 16 where the launcher's typical shapes make them so.

    python -m sparse_engine.kernels.aot                # full sweep (make aot-check)
    python -m sparse_engine.kernels.aot --subset       # representative subset (tests/test_aot.py)
    python -m sparse_engine.kernels.aot --only conv    # variants whose label matches a regex

Triton must not be in interpreter mode (TRITON_INTERPRET unset): the interpreter replaces the
kernels and the launchers' GPU config tables.
"""
import argparse
import dataclasses
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import triton

from sparse_engine.kernels.arch import smem_limit

ARCHS = (90, 80)

_PKG = "sparse_engine.kernels"
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.uint16: "u16",
                 torch.uint32: "u32"}
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compilation: kernel `module.kernel` with pointer element types, constexprs and launch options."""
    label: str                 # e.g. "sm90 masked_linear.fwd fp32 BLOCK 64x64x32 w4 s3"
    arch: int                  # 90 or 80
    module: str                # module of sparse_engine.kernels
    kernel: str                # attribute name of the @triton.jit (or @triton.autotune) kernel
    pointers: tuple            # ((arg, torch dtype), ...)
    constexprs: tuple          # ((arg, value), ...): meta-parameters and ints specialised to 1
    aligned: tuple = ()        # int args divisible by 16 in the typical launch
    num_warps: int = 4
    num_stages: int = 3


@dataclasses.dataclass
class Result:
    variant: Variant
    regs: int = 0
    spill: int = 0             # bytes of spill stores (ptxas -v)
    shared: int = 0            # bytes per block, dynamic + static
    error: str = ""
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        if self.error:
            return [f"compile error: {self.error}"]
        out = []
        if self.spill:
            out.append(f"spills ({self.spill} B of spill stores)")
        limit = smem_limit(self.variant.arch)
        if self.shared > limit:
            out.append(f"shared memory {self.shared} B > {limit} B")
        return out

    def line(self) -> str:
        status = "ok" if not self.failures else "FAIL: " + "; ".join(self.failures)
        return (f"{self.variant.label:<70} regs {self.regs:>3}  spill {self.spill:>6} B  "
                f"smem {self.shared:>7} B  {self.seconds:5.1f} s  {status}")


# ---- the variants each launcher can reach ----------------------------------------------------------

def _config_label(c) -> str:
    blocks = "x".join(str(c.kwargs[b]) for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if b in c.kwargs)
    return f"{blocks} w{c.num_warps} s{c.num_stages}"


def _masked_linear_variants(arch, stacked: bool = False):
    """masked_linear's kernels, or (``stacked``) stacked_masked_linear's: the same tiles and configs
    with a model axis (one more stride per operand, divisible by 16 for contiguous stacks)."""
    from sparse_engine.kernels import masked_linear as ml
    kernels = {
        "fwd": ("fwd_kernel", ("x_ptr", "w_ptr", "bias_ptr", "y_ptr"),
                ("stride_xk", "stride_wk", "stride_bits_w", "stride_bias", "stride_yn"),
                ("M", "N", "K", "stride_xm", "stride_wn", "stride_bits_n", "stride_ym"), {"HAS_BIAS": True}),
        "bwd_input": ("bwd_input_kernel", ("dy_ptr", "w_ptr", "dx_ptr"),
                      ("stride_dyn", "stride_wk", "stride_bits_w", "stride_dxk"),
                      ("M", "N", "K", "stride_dym", "stride_wn", "stride_bits_n", "stride_dxm"), {}),
        "bwd_weight": ("bwd_weight_kernel", ("dy_ptr", "x_ptr", "dw_ptr"),
                       ("stride_dyn", "stride_xk", "stride_bits_w", "stride_dwk"),
                       ("M", "N", "K", "stride_dym", "stride_xm", "stride_bits_n", "stride_dwn"), {}),
    }
    module, prefix = ("stacked_masked_linear", "_stacked_") if stacked else ("masked_linear", "_masked_linear_")
    for name, (kernel, floats, ones, aligned, extra) in kernels.items():
        if stacked:  # the bias's inner stride is stride_bias_n; every operand has a model stride
            ones = tuple("stride_bias_n" if o == "stride_bias" else o for o in ones)
            model_strides = {"bits_ptr": "stride_bits_s", "bias_ptr": "stride_bias_s"}
            aligned = aligned + tuple(model_strides.get(p, f"stride_{p.removesuffix('_ptr')}s")
                                      for p in floats + ("bits_ptr",))
        for dtype, tf32 in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False),
                            (torch.float32, True)):
            precision = "tf32" if tf32 else "ieee"
            for c in ml.reachable_configs(name, dtype, tf32, arch):
                consts = {**extra, "PRECISION": precision, **c.kwargs, **{o: 1 for o in ones}}
                tag = "tf32" if tf32 else _SHORT[dtype]
                yield Variant(
                    f"sm{arch} {module}.{name} {tag} {_config_label(c)}", arch, module, prefix + kernel,
                    tuple((p, dtype) for p in floats) + (("bits_ptr", torch.int32),),
                    tuple(consts.items()), aligned, c.num_warps, c.num_stages)


def _stacked_masked_linear_variants(arch):
    return _masked_linear_variants(arch, stacked=True)


def _masked_conv2d_variants(arch):
    from sparse_engine.kernels import masked_conv2d as mc
    # A 3x3 convolution, one group per model (G, a constexpr), unit dilation, contiguous NCHW operands
    # (inner strides 1).
    kernels = {
        "fwd": ("_masked_conv2d_fwd_kernel", ("x_ptr", "w_ptr", "bias_ptr", "y_ptr"),
                ("sxw", "sww", "syw", "dil_h", "dil_w"), {"HAS_BIAS": True}),
        "bwd_input": ("_masked_conv2d_bwd_input_kernel", ("dy_ptr", "w_ptr", "dx_ptr"),
                      ("sdw", "sww", "sxw", "dil_h", "dil_w"), {"SH": 1, "SW": 1}),
        "bwd_weight": ("_masked_conv2d_bwd_weight_kernel", ("dy_ptr", "x_ptr", "out_ptr"),
                       ("sdw", "sxw", "soc", "dil_h", "dil_w"), {}),
    }
    for name, (kernel, floats, ones, extra) in kernels.items():
        for dtype, tf32 in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False),
                            (torch.float32, True)):
            for c in mc.reachable_configs(name, dtype, tf32, arch):
                consts = {**extra, "G": 1, "KH": 3, "KW": 3, "DOT_PRECISION": "tf32" if tf32 else "ieee", **c.kwargs,
                          **{o: 1 for o in ones}}
                # bwd_weight writes fp32 partial sums when the reduction is split, x's dtype otherwise.
                types = tuple((p, torch.float32 if p == "out_ptr" else dtype) for p in floats)
                tag = "tf32" if tf32 else _SHORT[dtype]
                yield Variant(
                    f"sm{arch} masked_conv2d.{name} {tag} {_config_label(c)}", arch, "masked_conv2d", kernel,
                    types + (("bits_ptr", torch.int32),), tuple(consts.items()), (), c.num_warps, c.num_stages)


def _topk_mask_variants(arch):
    from sparse_engine.kernels import topk_mask as tk
    layout = {"BLOCK_W": tk._BLOCK_W, "SLOT_FIELDS": tk._SLOT_FIELDS, "GROUP_FIELDS": tk._GROUP_FIELDS}
    tables = (("chunk_slot_ptr", torch.int32), ("slot_ptr", torch.int64), ("state_ptr", torch.int64))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for largest in (True, False):
            meta = {"KEY_BITS": 32 if dtype == torch.float32 else 16, "INF_BITS": tk._INF_BITS[dtype],
                    "LARGEST": largest}
            tag = f"{_SHORT[dtype]} {'largest' if largest else 'smallest'}"
            for count_dtype in (torch.int32, torch.int64):
                for count_nan in (True, False):
                    yield Variant(
                        f"sm{arch} topk_mask.histogram {tag} counts {_TRITON_TYPES[count_dtype]} nan={count_nan}",
                        arch, "topk_mask", "_histogram_kernel",
                        tables + (("hist_ptr", count_dtype), ("above_ptr", torch.int64), ("nan_ptr", torch.int64)),
                        tuple({**meta, **layout, "COUNT_NAN": count_nan, "NUM_BINS": tk._NUM_BINS}.items()),
                        num_warps=tk._NUM_WARPS)
                yield Variant(
                    f"sm{arch} topk_mask.sample_histogram {tag} counts {_TRITON_TYPES[count_dtype]}",
                    arch, "topk_mask", "_sample_histogram_kernel",
                    (("slot_ptr", torch.int64), ("hist_ptr", count_dtype)),
                    tuple({**meta, "MULT": tk._SAMPLE_MULT, "BLOCK": tk._SAMPLE_BLOCK, "NUM_BINS": tk._NUM_BINS,
                           "SLOT_FIELDS": tk._SLOT_FIELDS}.items()),
                    num_warps=tk._NUM_WARPS)
            yield Variant(f"sm{arch} topk_mask.tie_count {tag}", arch, "topk_mask", "_tie_count_kernel",
                          tables + (("ties_ptr", torch.int32),), tuple({**meta, **layout}.items()),
                          num_warps=tk._NUM_WARPS)
            yield Variant(f"sm{arch} topk_mask.write_mask {tag}", arch, "topk_mask", "_write_mask_kernel",
                          tables + (("ties_before_ptr", torch.int32),), tuple({**meta, **layout}.items()),
                          num_warps=tk._NUM_WARPS)


def _block_solve_variants(arch):
    from sparse_engine.kernels import block_solve as bs
    for (block, one_block), warps in bs._FACTOR_WARPS.items():
        yield Variant(f"sm{arch} block_solve.cholesky BS{block} one_block={one_block} w{warps}", arch,
                      "block_solve", "_cholesky_kernel",
                      (("a_ptr", torch.float32), ("shift_ptr", torch.float32), ("l_ptr", torch.float32),
                       ("info_ptr", torch.int32)),
                      (("BS", block), ("KC", bs._KC), ("ONE_BLOCK", one_block)), num_warps=warps, num_stages=1)
    for (block, rhs), warps in bs._SOLVE_WARPS.items():
        yield Variant(f"sm{arch} block_solve.cholesky_solve BS{block} BR{rhs} w{warps}", arch,
                      "block_solve", "_cholesky_solve_kernel",
                      (("l_ptr", torch.float32), ("b_ptr", torch.float32), ("x_ptr", torch.float32)),
                      (("BS", block), ("BR", rhs), ("KC", bs._KC)), num_warps=warps, num_stages=1)


def _mask_pack_variants(arch):
    from sparse_engine.kernels import mask_pack as mp
    blocks = (("BLOCK_R", mp._BLOCK_R), ("BLOCK_W", mp._BLOCK_W))
    yield Variant(f"sm{arch} mask_pack.pack", arch, "mask_pack", "_pack_mask_kernel",
                  (("mask_ptr", torch.uint8), ("bits_ptr", torch.int32)), blocks + (("stride_mc", 1),),
                  ("C", "W", "stride_mr"))
    yield Variant(f"sm{arch} mask_pack.unpack", arch, "mask_pack", "_unpack_mask_kernel",
                  (("bits_ptr", torch.int32), ("mask_ptr", torch.uint8)), blocks + (("stride_bw", 1),),
                  ("C", "W", "stride_br"))
    # apply_mask_ zeroes weights and optimizer state (and bool masks through a uint8 view); masked_copy
    # builds W*M for the vendor ops. Contiguous rows: unit column stride.
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8):
        tag = _TRITON_TYPES[dtype]
        yield Variant(f"sm{arch} mask_pack.apply {tag}", arch, "mask_pack", "_apply_mask_kernel",
                      (("t_ptr", dtype), ("bits_ptr", torch.int32)), blocks + (("stride_tc", 1),),
                      ("C", "W", "stride_tr"))
        if dtype.is_floating_point:
            yield Variant(f"sm{arch} mask_pack.masked_copy {tag}", arch, "mask_pack", "_masked_copy_kernel",
                          (("t_ptr", dtype), ("bits_ptr", torch.int32), ("out_ptr", dtype)),
                          blocks + (("stride_tc", 1),), ("C", "W", "stride_tr"))


_MODULES = ("masked_linear", "stacked_masked_linear", "masked_conv2d", "topk_mask", "block_solve", "mask_pack")
_SOURCES = (_masked_linear_variants, _stacked_masked_linear_variants, _masked_conv2d_variants, _topk_mask_variants,
            _block_solve_variants, _mask_pack_variants)

# The subset `make test` compiles (tests/test_aot.py): per op, the kernels whose configs were
# spill-prone (fp32 products, the largest 16-bit tiles) and one of every other kernel, on sm_90.
_SUBSET_PATTERNS = (
    r"^sm90 masked_linear\.fwd fp32 ",
    r"^sm90 masked_linear\.bwd_input fp32 ",
    r"^sm80 masked_linear\.fwd fp16 ",
    r"^sm90 stacked_masked_linear\.bwd_weight bf16 ",
    r"^sm90 masked_conv2d\.bwd_input fp32 ",
    r"^sm90 topk_mask\.histogram fp32 largest counts i32 nan=True$",
    r"^sm90 topk_mask\.write_mask fp32 largest$",
    r"^sm90 block_solve\.cholesky BS64 one_block=False",
    r"^sm90 mask_pack\.pack$",
    r"^sm90 mask_pack\.masked_copy fp32$",
)


def variants(archs=ARCHS, subset: bool = False, only: str = "") -> list[Variant]:
    """Every variant the launchers can reach on `archs`; with `subset`, the representative few
    (for each subset pattern, the variant with the largest tiles among those it matches)."""
    found = [v for arch in archs for source in _SOURCES for v in source(arch)]
    if subset:
        picked = []
        for pattern in _SUBSET_PATTERNS:
            matches = [v for v in found if re.search(pattern, v.label)]
            if matches:
                picked.append(max(matches, key=_tile_volume))
        found = picked
    return [v for v in found if re.search(only, v.label)]


def _jit_function(obj):
    """The @triton.jit function inside obj (itself, or wrapped by @triton.autotune), else None."""
    while obj is not None and not isinstance(obj, triton.runtime.JITFunction):
        obj = obj.fn if isinstance(obj, triton.runtime.Autotuner) else None
    return obj


def uncovered_kernels(vs: list[Variant]) -> list[str]:
    """Triton kernels of sparse_engine.kernels that no variant compiles (a kernel added without
    telling the gate)."""
    covered = {(v.module, v.kernel) for v in vs}
    missing = []
    for module in _MODULES:
        mod = importlib.import_module(f"{_PKG}.{module}")
        for name, obj in vars(mod).items():
            if _jit_function(obj) is not None and name.endswith("_kernel") and (module, name) not in covered:
                missing.append(f"{module}.{name}")
    return missing


def _tile_volume(v: Variant) -> int:
    c = dict(v.constexprs)
    volume = 1
    for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        volume *= c.get(b, 1)
    return volume * v.num_stages


# ---- compiling one variant -----------------------------------------------------------------------

def _ptxas(arch: int) -> list[str]:
    """Triton's own ptxas for `arch` and the flags its make_cubin passes that change allocation."""
    from triton.backends.nvidia import compiler as nv
    try:
        tool = nv.get_ptxas(arch)
    except TypeError:  # some Triton versions: one ptxas for every architecture
        tool = nv.get_ptxas()
    path = tool.path if hasattr(tool, "path") else tool[0]  # older ones return (path, version)
    flags = ["--regAllocOptLevel=2"] if "regAllocOptLevel=2" in inspect.getsource(nv) else []
    return [path, "-v", *flags, f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}"]


def _resources(ptx: str, arch: int) -> tuple[int, int, int]:
    """(registers, spill store bytes, static shared bytes) that ptxas -v reports for a kernel's PTX.

    Triton runs ptxas -v itself but keeps the log only in a debug mode, and cuobjdump -res-usage
    misreads the register count of cubins from a newer ptxas, so the PTX is assembled again."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([*_ptxas(arch), src, "-o", os.path.join(tmp, "kernel.cubin")],
                              capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed: {log.strip()[-500:]}")
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise RuntimeError(f"unexpected ptxas -v output: {log.strip()[-500:]}")
    return int(regs.group(1)), int(spill.group(1)), int(smem.group(1)) if smem else 0


def compile_kernel(v: Variant):
    """triton.compile of one variant for its architecture: the CompiledKernel (asm["ttir"], ["ptx"], ...)."""
    kernel = getattr(importlib.import_module(f"{_PKG}.{v.module}"), v.kernel)
    fn = _jit_function(kernel)
    consts = dict(v.constexprs)
    pointers = dict(v.pointers)
    signature = {}
    for arg in fn.arg_names:
        if arg in consts:
            signature[arg] = "constexpr"
        elif arg in pointers:
            signature[arg] = "*" + _TRITON_TYPES[pointers[arg]]
        else:
            signature[arg] = "i32"
    missing = [a for a in consts.keys() | pointers.keys() if a not in fn.arg_names]
    if missing:
        raise ValueError(f"{v.kernel} has no arguments {missing}")
    aligned = set(pointers) | set(v.aligned)
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned}
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    target = triton.backends.compiler.GPUTarget("cuda", v.arch, 32)
    return triton.compile(src, target=target, options={"num_warps": v.num_warps, "num_stages": v.num_stages})


def compile_variant(v: Variant) -> Result:
    """Compiles one variant for its architecture; errors are returned in the result, not raised."""
    start = time.perf_counter()
    result = Result(v)
    try:
        compiled = compile_kernel(v)
        regs, spill, static = _resources(compiled.asm["ptx"], v.arch)
        result.regs, result.spill, result.shared = regs, spill, compiled.metadata.shared + static
    except Exception as e:  # a compile error is a result of the gate
        result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    result.seconds = time.perf_counter() - start
    return result


# Strides that must enter int64 arithmetic only (widened before they multiply): with a transposed
# view or a large image, stride * index passes 2**31. Checked in the TTIR of the smallest config of
# each kernel, compiled with those strides as runtime ints: every use of the argument must be an
# arith.extsi to i64.
_WIDE_STRIDES = (
    (r"^sm90 masked_linear\.fwd fp16 ", ("stride_xk", "stride_wk")),
    (r"^sm90 masked_linear\.bwd_input fp16 ", ("stride_dyn",)),
    (r"^sm90 masked_conv2d\.fwd fp16 ", ("sxs", "sxc", "sxh", "sys", "syh")),
    (r"^sm90 masked_conv2d\.bwd_input fp16 ", ("sds", "sdc", "sxs", "sxh")),
    (r"^sm90 masked_conv2d\.bwd_weight fp16 ", ("sds", "sxs", "sxc", "sxh", "sdh")),
)


def narrow_offsets() -> list[str]:
    """Stride arguments of _WIDE_STRIDES that some instruction uses as a 32-bit value."""
    found = []
    for pattern, strides in _WIDE_STRIDES:
        v = min(variants((90,), only=pattern), key=_tile_volume)
        v = dataclasses.replace(v, constexprs=tuple((k, c) for k, c in v.constexprs if k not in strides))
        body = [line.strip() for line in compile_kernel(v).asm["ttir"].splitlines() if "tt.func" not in line]
        for stride in strides:
            uses = [line for line in body if re.search(rf"%{stride}\b", line)]
            narrow = [u for u in uses if not re.search(rf"arith\.extsi %{stride} : i32 to i64", u)]
            if narrow:
                found.append(f"{v.module}.{v.kernel}: {stride} used as i32: {narrow[0][:160]}")
    return found


def run(vs: list[Variant], jobs: int = 1, log=print) -> list[Result]:
    """Compiles `vs` (in `jobs` processes) and logs one line each; returns the results in order."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the AOT gate compiles real kernels; unset it")
    if jobs > 1:
        import multiprocessing
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = []
            for r in pool.map(compile_variant, vs):
                log(r.line())
                results.append(r)
            return results
    results = []
    for v in vs:
        results.append(compile_variant(v))
        log(results[-1].line())
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", action="store_true", help="the representative subset only")
    parser.add_argument("--only", default="", help="variants whose label matches this regular expression")
    parser.add_argument("--arch", type=int, action="append", choices=ARCHS, help="repeatable; default: both")
    parser.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    parser.add_argument("--list", action="store_true", help="print the variants without compiling")
    parser.add_argument("--no-offsets", dest="offsets", action="store_false",
                        help="skip the check that large strides enter only int64 arithmetic")
    args = parser.parse_args(argv)
    vs = variants(tuple(args.arch or ARCHS), args.subset, args.only)
    missing = uncovered_kernels(variants())
    if missing:
        print(f"kernels the gate does not compile (add them to kernels/aot.py): {missing}")
        return 1
    if args.list:
        print("\n".join(v.label for v in vs))
        print(f"{len(vs)} variants")
        return 0
    start = time.perf_counter()
    results = run(vs, args.jobs)
    failed = [r for r in results if r.failures]
    narrow = narrow_offsets() if args.offsets else []
    print(f"\n{len(results)} variants compiled in {time.perf_counter() - start:.0f} s "
          f"(triton {triton.__version__}): {len(failed)} failed")
    for r in failed:
        print("  " + r.line())
    for line in narrow:
        print("  32-bit offset: " + line)
    return 1 if failed or narrow else 0


if __name__ == "__main__":
    sys.exit(main())
