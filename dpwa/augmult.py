"""Augmentation multiplicity (De et al. 2022, section 3.1; Fort et al. 2021).

Each example in a batch gets K augmented views (reflect-pad then random crop, random
horizontal flip). DP-SGD then uses, per example, the mean of the gradients of its K views
and clips that mean once: the example's contribution still has norm <= C, so the privacy
analysis is unchanged. Clipping each view separately would be a privacy bug (sensitivity
K*C), see `dpwa.privacy.per_example_grads`. The coins come from `generator` row by row, so a
row's views depend on its position in the batch: in a private run they must be secret
(`dpwa.train._augment_coins`), or one more example would move the others' views.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["augmult_views"]


def augmult_views(x: torch.Tensor, *, k: int, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, C, H, W): K random crops/flips of each image, vectorised.

    With pad=0 and flip=False every view is the image itself (no augmentation).
    """
    b, c, h, w = x.shape
    views = x.unsqueeze(1).expand(b, k, c, h, w).reshape(b * k, c, h, w)
    if pad:
        padded = F.pad(views.float(), (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b * k,), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (b * k,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None, :])  # (BK, H)
        cols = (dx[:, None] + torch.arange(w)[None, :])  # (BK, W)
        idx = torch.arange(b * k)[:, None, None, None]
        views = padded[idx, torch.arange(c)[None, :, None, None], rows[:, None, :, None], cols[:, None, None, :]]
        views = views.to(x.dtype)
    if flip:
        mask = torch.rand(b * k, generator=generator) < 0.5
        views = torch.where(mask[:, None, None, None], views.flip(-1), views)
    return views.reshape(b, k, c, h, w)
