"""What the launchers need to know about a GPU architecture: its capability and its shared memory.

Capabilities are written as one int, major * 10 + minor (90 for sm_90/H100, 80 for sm_80/A100), as
Triton's GPUTarget does. The config tables of kernels/masked_linear.py and kernels/masked_conv2d.py
are chosen per architecture with these; kernels/aot.py compiles them for sm_90a and sm_80.
"""
import functools

import torch

# Shared memory a block can use (the opt-in maximum), by capability. sm_86/89/120 have 99 KiB,
# sm_80/87 163 KiB, sm_90/100 227 KiB. Unknown ones use the device's own report.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024,
              100: 227 * 1024, 120: 99 * 1024}


@functools.lru_cache(maxsize=None)
def _device_arch(index: int) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(index)
    arch = 10 * major + minor
    props = torch.cuda.get_device_properties(index)
    limit = getattr(props, "shared_memory_per_block_optin", 0) or SMEM_LIMIT.get(arch, 99 * 1024)
    return arch, limit


def device_arch(device: torch.device) -> tuple[int, int]:
    """(capability as major*10 + minor, usable shared memory per block in bytes) of a CUDA device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_arch(index)


def smem_limit(arch: int) -> int:
    """Usable shared memory per block of capability `arch` (bytes)."""
    if arch not in SMEM_LIMIT:
        raise ValueError(f"arch: expected one of {sorted(SMEM_LIMIT)} (major*10 + minor), got {arch}")
    return SMEM_LIMIT[arch]
