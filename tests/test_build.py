"""The build, and the compiled functions of sparse_engine._C called directly.

- The CMake build of csrc/ is the CUDA compile check: it compiles the .cu files for sm_80 and
  sm_90a with nvcc on machines that have no GPU and a CPU-only torch, and fails on a register spill
  (``ptxas -warn-spills -Werror``; ``-v`` prints each kernel's registers and spills, checked here too).
- pack_mask / unpack_mask / masked_linear_* are checked against float64 plain-torch references:
  exact equality for the bit packing; for the matmuls, an error at most twice torch's own error
  in the same dtype (plus one rounding step), and exact zeros at pruned gradient entries.
  The CUDA variants run under `pytest -m gpu` on a machine with a GPU and CUDA kernels built.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from sparse_engine import _C

ROOT = Path(__file__).resolve().parent.parent

DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (M, N, K): odd sizes, N = 257 crosses the CPU path's 256-row chunk, K crosses 32-bit words.
SHAPES = [(1, 7, 97), (7, 131, 33), (97, 257, 131), (257, 1, 7)]
SPARSITIES = [0.0, 0.5, 0.99, 1.0]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(cuda_home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else None


def test_cmake_builds_csrc(tmp_path):
    """Configure and build csrc/ with CMake: every .cu file must compile for sm_80 and sm_90a, no
    kernel spilling registers."""
    nvcc = _nvcc()
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found: the CUDA compile check needs cmake >= 3.25")
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): no CUDA compile check possible")
    build = tmp_path / "build"
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={nvcc}"],
        ["cmake", "--build", str(build), "-j2"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
    # ptxas -v: one "N bytes spill stores, M bytes spill loads" line per compiled function and architecture.
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", proc.stdout + proc.stderr)
    assert len(spills) >= 2 * len(list((ROOT / "csrc" / "cuda").glob("*.cu"))), "no ptxas -v report in the build log"
    assert all(stores == "0" and loads == "0" for stores, loads in spills), f"register spills: {spills}"
    objects = {p.name for p in build.rglob("*.o")}
    for cu in (ROOT / "csrc" / "cuda").glob("*.cu"):
        assert f"{cu.name}.o" in objects, f"no object file for {cu.name}; built: {sorted(objects)}"


def test_cuda_built_matches_torch():
    if torch.version.cuda is None:
        assert not _C.cuda_built(), "CUDA kernels reported built against a CPU-only torch"
    if os.environ.get("SPARSE_ENGINE_CUDA") == "1":
        assert _C.cuda_built()


# --------------------------------------------------------------------------------------------
# Mask bit packing

def pack_ref(mask: torch.Tensor) -> torch.Tensor:
    """Contract layout in plain torch: bit j of word w of row r = mask[r, 32*w + j]."""
    rows, cols = mask.shape
    words = (cols + 31) // 32
    padded = torch.zeros(rows, words * 32, dtype=torch.int64)
    padded[:, :cols] = mask.cpu()
    packed = (padded.view(rows, words, 32) << torch.arange(32)).sum(-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cols", [1, 31, 32, 33, 97])
@pytest.mark.parametrize("density", [0.0, 0.5, 1.0], ids=lambda d: f"density{d}")
def test_pack_unpack_roundtrip(device, cols, density):
    mask = (torch.rand(5, cols) < density).to(device)
    bits = _C.pack_mask(mask)
    assert bits.dtype == torch.int32 and bits.shape == (5, (cols + 31) // 32) and bits.device == mask.device
    assert torch.equal(bits.cpu(), pack_ref(mask))
    back = _C.unpack_mask(bits, cols)
    assert back.dtype == torch.bool and torch.equal(back, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_mask_non_contiguous(device):
    base = torch.rand(70, 90, device=device) < 0.5
    for view in (base.t(), base[::3, 1::2], base[:, 5:38]):
        assert not view.is_contiguous()
        assert torch.equal(_C.pack_mask(view), _C.pack_mask(view.contiguous()))
        assert torch.equal(_C.unpack_mask(_C.pack_mask(view), view.shape[1]), view)


def test_pack_mask_empty():
    assert _C.pack_mask(torch.zeros(0, 40, dtype=torch.bool)).shape == (0, 2)
    assert _C.pack_mask(torch.zeros(3, 0, dtype=torch.bool)).shape == (3, 0)
    assert _C.unpack_mask(torch.zeros(3, 0, dtype=torch.int32), 0).shape == (3, 0)


# --------------------------------------------------------------------------------------------
# masked_linear

def _inputs(M, N, K, sparsity, dtype, device, contiguous):
    """x (M, K), weight (N, K), dy (M, N), bias (N,) random, mask (N, K); strided views if asked.
    The views are taken after the cast: .to() would make a sliced tensor contiguous."""
    def randn(*shape):
        return torch.randn(*shape).to(device=device, dtype=dtype)
    if contiguous:
        x, w, dy = randn(M, K), randn(N, K), randn(M, N)
    else:
        x, w, dy = randn(K, M).t(), randn(N, 2 * K)[:, ::2], randn(N, M).t()
    mask = (torch.rand(N, K) >= sparsity).to(device)
    return x, w, dy, randn(N), mask


def _check_close(out, ref64, torch_lp, what):
    """out within 2x torch's own error in out's dtype, plus one rounding of the largest value."""
    assert out.dtype == torch_lp.dtype and out.shape == ref64.shape, what
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    err_torch = (torch_lp.double() - ref64).abs().max().item() if out.numel() else 0.0
    scale = ref64.abs().max().item() if out.numel() else 0.0
    allowed = 2 * err_torch + torch.finfo(out.dtype).eps * scale
    assert err <= allowed, f"{what}: max error {err:.3g} > {allowed:.3g} (torch's own {err_torch:.3g})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("contiguous", [True, False], ids=["contig", "strided"])
@pytest.mark.parametrize("sparsity", SPARSITIES, ids=lambda s: f"sparsity{s}")
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}".format(*s))
def test_masked_linear(shape, dtype, sparsity, contiguous, device):
    M, N, K = shape
    x, w, dy, bias, mask = _inputs(M, N, K, sparsity, dtype, device, contiguous)
    assert contiguous or not w.is_contiguous()  # x, dy: transposes, "contiguous" where M or N is 1
    bits = _C.pack_mask(mask)
    wm = w * mask
    x64, wm64, dy64 = x.double(), wm.double(), dy.double()

    y = _C.masked_linear_fwd(x, w, bits, bias)
    _check_close(y, x64 @ wm64.t() + bias.double(), torch.addmm(bias, x, wm.t()), "forward with bias")
    y = _C.masked_linear_fwd(x, w, bits, None)
    _check_close(y, x64 @ wm64.t(), x @ wm.t(), "forward")

    dx = _C.masked_linear_bwd_input(dy, w, bits)
    _check_close(dx, dy64 @ wm64, dy @ wm, "grad input")

    dw = _C.masked_linear_bwd_weight(dy, x, bits)
    _check_close(dw, (dy64.t() @ x64) * mask, (dy.t() @ x) * mask, "grad weight")
    assert (dw[~mask] == 0).all(), "grad weight: pruned entries are not exact zeros"


@pytest.mark.parametrize("device", DEVICES)
def test_masked_linear_empty_dims(device):
    w = torch.randn(5, 40, device=device)
    bits = _C.pack_mask(torch.rand(5, 40, device=device) < 0.5)
    assert _C.masked_linear_fwd(torch.randn(0, 40, device=device), w, bits, None).shape == (0, 5)
    assert _C.masked_linear_bwd_input(torch.randn(0, 5, device=device), w, bits).shape == (0, 40)
    dw = _C.masked_linear_bwd_weight(torch.randn(0, 5, device=device), torch.randn(0, 40, device=device), bits)
    assert dw.shape == (5, 40) and (dw == 0).all()
    # K = 0: the product is empty and y is the bias alone.
    bias = torch.randn(5, device=device)
    y = _C.masked_linear_fwd(torch.randn(3, 0, device=device), torch.randn(5, 0, device=device),
                             torch.zeros(5, 0, dtype=torch.int32, device=device), bias)
    assert torch.equal(y, bias.expand(3, 5))


# --------------------------------------------------------------------------------------------
# Argument errors

def test_pack_mask_errors():
    with pytest.raises(RuntimeError, match="mask must be torch.bool"):
        _C.pack_mask(torch.ones(3, 4))
    with pytest.raises(RuntimeError, match="mask must be 2-D"):
        _C.pack_mask(torch.ones(2, 3, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="must be a CPU or CUDA tensor"):
        _C.pack_mask(torch.ones(3, 4, dtype=torch.bool, device="meta"))


def test_unpack_mask_errors():
    with pytest.raises(RuntimeError, match=r"mask_bits must have shape \(rows, 2\) for cols=33"):
        _C.unpack_mask(torch.zeros(3, 1, dtype=torch.int32), 33)
    with pytest.raises(RuntimeError, match="mask_bits must be int32"):
        _C.unpack_mask(torch.zeros(3, 1, dtype=torch.int64), 20)
    with pytest.raises(RuntimeError, match="cols must be >= 0"):
        _C.unpack_mask(torch.zeros(3, 0, dtype=torch.int32), -1)


def test_masked_linear_errors():
    x, w = torch.randn(4, 40), torch.randn(6, 40)
    bits = _C.pack_mask(torch.ones(6, 40, dtype=torch.bool))
    with pytest.raises(RuntimeError, match=r"mask_bits must have shape \(6, 2\) to mask a \(6, 40\) weight"):
        _C.masked_linear_fwd(x, w, bits[:, :1], None)
    with pytest.raises(RuntimeError, match=r"mask_bits must have shape \(6, 2\)"):
        _C.masked_linear_bwd_input(torch.randn(4, 6), w, bits[:5])
    with pytest.raises(RuntimeError, match="mask_bits must be int32"):
        _C.masked_linear_bwd_weight(torch.randn(4, 6), x, bits.long())
    with pytest.raises(RuntimeError, match="weight must have the dtype of x"):
        _C.masked_linear_fwd(x, w.double(), bits, None)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(N, 40\)"):
        _C.masked_linear_fwd(x, torch.randn(6, 41), bits, None)
    with pytest.raises(RuntimeError, match=r"bias must have shape \(6,\)"):
        _C.masked_linear_fwd(x, w, bits, torch.randn(5))
    with pytest.raises(RuntimeError, match="bias must have the dtype of x"):
        _C.masked_linear_fwd(x, w, bits, torch.randn(6, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="x must be float32, float64, float16 or bfloat16"):
        _C.masked_linear_fwd(x.int(), w.int(), bits, None)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        _C.masked_linear_fwd(x[None], w, bits, None)
    with pytest.raises(RuntimeError, match=r"dy must have shape \(M, 6\)"):
        _C.masked_linear_bwd_input(torch.randn(4, 7), w, bits)
    with pytest.raises(RuntimeError, match="x and dy must have the same number of rows"):
        _C.masked_linear_bwd_weight(torch.randn(5, 6), x, bits)
