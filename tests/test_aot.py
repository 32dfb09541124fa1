"""The ahead-of-time compile gate (kernels/aot.py): Triton kernels compiled for sm_90a / sm_80 without a GPU.

The gate needs real Triton (not the interpreter that conftest.py turns on), so it runs in a
subprocess with TRITON_INTERPRET unset. Here: the variant list covers every kernel, and a
representative subset compiles with no error, no spill and shared memory within the limit, and
the strides that can push offsets past 2**31 enter only int64 arithmetic (checked in the TTIR).
The full sweep is `make aot-check` (all kernels, configs, dtypes and both architectures).
"""
import os
import subprocess
import sys

import pytest
import torch

from sparse_engine.kernels import masked_conv2d, masked_linear


def _gate(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return subprocess.run([sys.executable, "-m", "sparse_engine.kernels.aot", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


def test_every_kernel_has_variants_on_both_architectures():
    proc = _gate("--list")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    labels = proc.stdout.splitlines()[:-1]
    for arch in ("sm90", "sm80"):
        for op in ("masked_linear.fwd", "masked_linear.bwd_input", "masked_linear.bwd_weight",
                   "masked_conv2d.fwd", "masked_conv2d.bwd_input", "masked_conv2d.bwd_weight",
                   "topk_mask.histogram", "topk_mask.sample_histogram", "topk_mask.tie_count",
                   "topk_mask.write_mask", "block_solve.cholesky ", "block_solve.cholesky_solve",
                   "mask_pack.pack", "mask_pack.unpack"):
            for dtype in (("fp16", "bf16", "fp32", "tf32") if op.startswith("masked_") else ("",)):
                assert any(l.startswith(f"{arch} {op}") and f" {dtype}" in l for l in labels), (arch, op, dtype)


@pytest.mark.parametrize("module", [masked_linear, masked_conv2d], ids=["masked_linear", "masked_conv2d"])
def test_reachable_configs_per_architecture(module):
    """Each dtype has configs on both architectures and on GPUs with less shared memory; float64 is
    refused (CUDA has no float64 configs)."""
    for kernel in ("fwd", "bwd_input", "bwd_weight"):
        for dtype, tf32 in ((torch.float16, False), (torch.bfloat16, False), (torch.float32, False),
                            (torch.float32, True)):
            sm90 = module.reachable_configs(kernel, dtype, tf32, 90)
            sm80 = module.reachable_configs(kernel, dtype, tf32, 80)
            assert sm90 and sm80, (kernel, dtype, tf32)
        # A device with less shared memory (its own report, passed by the pruner) gets other configs,
        # but some: sm_86/89 have 99 KiB.
        for smem in (48 * 1024, 99 * 1024):
            small = module.reachable_configs(kernel, torch.float32, True, 80, smem=smem)
            assert small, (kernel, smem)
        with pytest.raises(ValueError, match="dtype"):
            module.reachable_configs(kernel, torch.float64, False, 90)


def test_representative_subset_compiles_clean():
    proc = _gate("--subset", "--jobs", "2")
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    assert " 0 failed" in proc.stdout
