"""Input perturbations in plain torch: uniform noise (torchprune's eps-ball protocol) and common
corruptions at five severities, for small grayscale or colour images such as Fashion-MNIST's.

Uniform noise (Liebenwein et al. 2021, "Lost in Pruning", ``paper/lost/script/eps_ball.py``):
``x + eps * u``, ``u`` uniform in ``[-1, 1]`` per input entry, added in the model's *normalised*
input space, at ``NOISE_LEVELS = linspace(0, 0.7, 15)``.

Common corruptions (after Hendrycks & Dietterich 2019, "Benchmarking Neural Network Robustness to
Common Corruptions", with their CIFAR-10-C severity parameters, which suit 28x28 and 32x32
images) act on *pixels* in ``[0, 1]``, images ``(N, C, H, W)``, and return pixels in ``[0, 1]``:

==================  =========================================  ===============================
name                what                                        parameter at severity 1..5
==================  =========================================  ===============================
``gaussian_noise``  ``x + N(0, c^2)``                           c = .04 .06 .08 .09 .10
``shot_noise``      ``Poisson(c x) / c``                        c = 500 250 100 75 50
``impulse_noise``   a fraction c of pixels set to 0 or 1        c = .01 .02 .03 .05 .07
``speckle_noise``   ``x + x N(0, c^2)``                         c = .06 .10 .12 .16 .20
``gaussian_blur``   Gaussian filter of std c pixels             c = .4 .6 .7 .8 1.0
``contrast``        ``(x - m) c + m``, m the image's mean       c = .75 .5 .4 .3 .15
``brightness``      ``x + c``                                   c = .05 .1 .15 .2 .3
``pixelate``        area-downsample to ``c`` of the size, then  c = .95 .9 .85 .75 .65
                    nearest-upsample back
==================  =========================================  ===============================

Every result is clipped to ``[0, 1]``. The random ones draw from the given ``torch.Generator``.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

NOISE_LEVELS = tuple(float(e) for e in torch.linspace(0, 0.7, 15, dtype=torch.float64))
SEVERITIES = (1, 2, 3, 4, 5)
PARAMETERS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500, 250, 100, 75, 50),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
CORRUPTIONS = tuple(PARAMETERS)


def _like(x: Tensor, generator: Optional[torch.Generator], fn) -> Tensor:
    """A random tensor of ``x``'s shape drawn on the generator's device by ``fn(shape, generator)``,
    moved to ``x``'s device and dtype (so a CPU generator gives the same draws for any device)."""
    return fn(x.shape, generator).to(device=x.device, dtype=x.dtype)


def uniform_noise(x: Tensor, eps: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """``x + eps * u``, ``u`` uniform in ``[-1, 1]`` per entry (torchprune's ``imgs + 2 eps (rand - 0.5)``)."""
    u = _like(x, generator, lambda s, g: torch.rand(s, generator=g))
    return x + 2 * eps * (u - 0.5)


def _gaussian_kernel(sigma: float, dtype, device) -> Tensor:
    radius = max(1, math.ceil(4 * sigma))  # scipy/skimage's truncate=4.0
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian filter of std ``sigma`` pixels over H and W, edges replicated (skimage's 'nearest')."""
    n, c, h, w = x.shape
    k = _gaussian_kernel(sigma, x.dtype, x.device)
    r = k.numel() // 2
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def pixelate(x: Tensor, factor: float) -> Tensor:
    """Area-downsample to ``round(factor * size)`` and nearest-upsample back."""
    h, w = x.shape[-2:]
    small = F.interpolate(x, size=(max(1, round(factor * h)), max(1, round(factor * w))), mode="area")
    return F.interpolate(small, size=(h, w), mode="nearest")


def corrupt(x: Tensor, name: str, severity: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """Corruption ``name`` (one of ``CORRUPTIONS``) at ``severity`` (1..5) of pixels ``x`` in ``[0, 1]``,
    ``(N, C, H, W)`` float; returns a new tensor of pixels in ``[0, 1]``."""
    if name not in PARAMETERS:
        raise ValueError(f"name: expected one of {CORRUPTIONS}, got {name!r}")
    if isinstance(severity, bool) or not isinstance(severity, int) or severity not in SEVERITIES:
        raise ValueError(f"severity: expected an int in {SEVERITIES}, got {severity!r}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 4:
        raise ValueError(f"x: expected float images of shape (N, C, H, W), got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    c = PARAMETERS[name][severity - 1]
    if name == "gaussian_noise":
        y = x + c * _like(x, generator, lambda s, g: torch.randn(s, generator=g))
    elif name == "shot_noise":
        y = torch.poisson((x.clamp(0, 1) * c).cpu().double(), generator=generator).to(x) / c
    elif name == "impulse_noise":
        u = _like(x, generator, lambda s, g: torch.rand(s, generator=g))
        y = torch.where(u < c / 2, 0.0, torch.where(u < c, 1.0, x))
    elif name == "speckle_noise":
        y = x + x * c * _like(x, generator, lambda s, g: torch.randn(s, generator=g))
    elif name == "gaussian_blur":
        y = gaussian_blur(x, c)
    elif name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        y = (x - mean) * c + mean
    elif name == "brightness":
        y = x + c
    else:
        y = pixelate(x, c)
    return y.clamp(0, 1)
