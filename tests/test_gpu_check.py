"""`make gpu-check` (bench/gpu_check.py) in its CPU skip mode: it must keep working between GPU sessions."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU mode is what `make gpu-check` runs on a lent GPU")
def test_skip_mode_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "Skip mode: no CUDA device" in summary
    # every benchmark is planned and still takes --quick and --out-dir
    for script in (ROOT / "bench").glob("bench_*.py"):
        assert f"| bench {script.name} | skipped (no GPU); options checked |" in summary, script.name
    for step in ("build (TORCH_CUDA_ARCH_LIST=9.0a)", "pytest -m gpu", "demo"):
        assert f"| {step} | skipped (no GPU) |" in summary
    assert len(list(tmp_path.iterdir())) <= 8
