"""Fixed, data-independent feature extractors applied once before private training.

ScatterNet (Tramer & Boneh 2021, "Differentially private learning needs better features
(or much more data)"): a scattering transform (Oyallon & Mallat 2015) with J=2 scales and
L=8 angles turns a (C, H, W) image into (81 C, H/4, W/4) wavelet-modulus features. Its
filters are fixed Morlet wavelets, not learned, so computing it touches no privacy budget
beyond what training on the features then spends. A small CNN on these features is the
strongest from-scratch DP-SGD model at CPU scale (69.3% on CIFAR-10 at epsilon 3 in the
paper, against about 60% for the same budget end to end).

Features are computed once for every split (about 2 minutes for CIFAR-10 on 2 cores), so
augmentation, which would need the transform per view, is not available with them.
"""

from __future__ import annotations

import torch

__all__ = ["FEATURES", "scattering", "feature_shape"]

FEATURES: dict = {}  # name -> (N, C, H, W) normalised images -> fixed features; "none" keeps the images


def _scattering_module(h: int, w: int, j: int, angles: int) -> torch.nn.Module:
    try:
        # The 2-D frontend directly: `kymatio.torch` also imports the 3-D transform, which
        # needs scipy.special.sph_harm, gone from scipy >= 1.17.
        from kymatio.scattering2d.frontend.torch_frontend import ScatteringTorch2D
    except ImportError as e:
        raise ImportError("data.features=scattering needs kymatio (pip install 'kymatio==0.3.*'; it is in "
                          "dpwa's [train] extra)") from e
    return ScatteringTorch2D(J=j, shape=(h, w), L=angles)


def feature_shape(channels: int, h: int, w: int, j: int = 2, angles: int = 8) -> tuple[int, int, int]:
    """Output shape of `scattering`: 1 + J L + L^2 J (J-1) / 2 coefficients per channel."""
    per_channel = 1 + j * angles + angles * angles * j * (j - 1) // 2
    return channels * per_channel, h // 2 ** j, w // 2 ** j


@torch.no_grad()
def scattering(x: torch.Tensor, *, j: int = 2, angles: int = 8, batch_size: int = 500) -> torch.Tensor:
    """(N, C, H, W) float images -> (N, C * 81, H/4, W/4) float32 scattering features (J=2, L=8)."""
    n, c, h, w = x.shape
    module = _scattering_module(h, w, j, angles)
    out = torch.empty((n, *feature_shape(c, h, w, j, angles)), dtype=torch.float32)
    for i in range(0, n, batch_size):
        part = x[i:i + batch_size].float().contiguous()
        out[i:i + len(part)] = module(part).reshape(len(part), -1, h // 2 ** j, w // 2 ** j)
    return out


FEATURES["scattering"] = scattering
