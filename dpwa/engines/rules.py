"""Per-layer rules of the dpwa-fast engine: per-example squared gradient norms and the
clipped sum of per-example gradients, from a layer's input and output gradient.

A dense layer (Linear, Conv2d, weight-standardised Conv2d, timm's ScaledStdConv2d) is seen as
positions p (tokens, output pixels, and an example's K augmented views, which are just more
positions of the same example) and groups g: per example b the weight gradient is
G_b = sum_p go[b, p]^T a[b, p], a contraction over positions. Two ways to get |G_b|^2:

* instantiate G_b (B x params of memory, cost ~ P * d_in * d_out per example), or
* ghost norm (Goodfellow 2015; Li et al. 2021, "Large language models can be strong
  differentially private learners"; Bu et al. 2022, mixed ghost clipping):
  |G_b|^2 = sum_{p,q} (a_p . a_q)(go_p . go_q), cost ~ P^2 (d_in + d_out), no per-example
  gradient in memory. For a conv, a_p . a_q is read from the Gram matrix of the padded
  input's pixels (cost ~ U^2 C_in for U pixels) instead of unfolding patches (P^2 C_in k^2).

`DenseRule` picks the cheaper per layer from the shapes (Bu et al.'s mixed rule). The clipped sum is
book-kept (Bu et al. 2023, "Differentially private optimization on large model at small
cost"): with clip factors c_b known, sum_b c_b G_b = conv/linear weight-gradient of
(c * go) and a, one pass as in non-private training, no second backward.

Weight-standardised convs use w_eff = m * w_hat, w_hat = (w - mean) / sqrt(var + eps) per
output channel (m = 1 for WSConv2d, gain * fan_in^-1/2 for ScaledStdConv2d). The per-example
gradient with respect to the raw w is, per channel, (m/s) (G - mean(G) - w_hat mean(G w_hat)),
the layer-norm backward; its squared norm is, with n the fan-in, S1 = sum G and
S2 = sum G w_hat: (m/s)^2 (|G|^2 - S1^2/n - S2^2 (2n - |w_hat|^2)/n^2), and the gain's
gradient is scale * S2 (m = gain * scale). The clipped sum, linear in the per-example
gradients, is pulled back through the standardisation once. S2 needs a_p . w_hat_o, which is the layer's own pre-bias output over m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Record", "rule_for", "SUPPORTED", "is_supported", "problem"]


@dataclass
class Record:
    """What a forward hook saw: the layer, its input and its output (N = B * K rows)."""

    module: nn.Module
    x: torch.Tensor
    out: torch.Tensor
    version: int  # out._version at forward time: an in-place change later would corrupt go


def _sq_norms(per_example: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,) squared L2 norms, without a squared copy of the input."""
    flat = per_example.reshape(per_example.shape[0], -1)
    return torch.einsum("bi,bi->b", flat, flat)


def _ws_parts(module: nn.Module) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[str]]]:
    """(w_hat (O, n), m (O,), s (O,), gain param name or None) for standardised convs, else None."""
    from ..models.ws import WSConv2d

    w = module.weight.detach().flatten(1)
    if isinstance(module, WSConv2d):
        eps, m, gain = module.eps, torch.ones(w.shape[0], dtype=w.dtype, device=w.device), None
    elif _is_scaled_std(module):
        eps, m, gain = module.eps, (module.gain.detach() * module.scale).flatten(), "gain"
    else:
        return None
    mean = w.mean(1, keepdim=True)
    s = torch.sqrt(w.var(1, unbiased=False, keepdim=True) + eps)
    return (w - mean) / s, m, s.flatten(), gain


def _is_scaled_std(module: nn.Module) -> bool:
    return type(module).__name__ in ("ScaledStdConv2d", "ScaledStdConv2dSame") and hasattr(module, "gain")


def _effective_weight(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """The weight the layer convolves with, as a function of a raw weight `w` (gain fixed)."""
    from ..models.ws import WSConv2d, standardize

    if isinstance(module, WSConv2d):
        return standardize(w, module.eps)
    gain = (module.gain.detach() * module.scale).reshape(-1)
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=gain, training=True, momentum=0.0,
                        eps=module.eps).reshape_as(w)


class DenseRule:
    """Linear and (grouped, strided, padded, dilated) Conv2d, plain or weight-standardised."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str) -> None:
        self.rec, self.m, self.batch = rec, rec.module, batch
        self.conv = isinstance(self.m, nn.Conv2d)
        self.groups = self.m.groups if self.conv else 1
        self.go = go
        self.ws = _ws_parts(self.m)
        o, din = self.m.weight.shape[0], self.m.weight[0].numel()
        k = go.shape[0] // batch
        positions = go[0].numel() // o * k
        inst = positions * din * o
        if self.conv:  # pixel Gram of the padded input (KU)^2 C, then the output-gradient Gram
            u = k * (rec.x.shape[-2] + 2 * self.m.padding[0]) * (rec.x.shape[-1] + 2 * self.m.padding[1])
            ghost = u * u * rec.x.shape[1] + positions * positions * o
        else:
            ghost = positions * positions * (din + o)
        self.ghost = mode == "ghost" or (mode == "auto" and ghost < inst)
        self.per_example: dict[str, torch.Tensor] = {}

    # -- layout: a (B, P, g, din), go (B, P, g, dout) -------------------------------------
    def _a(self) -> torch.Tensor:
        x, m, b, g = self.rec.x, self.m, self.batch, self.groups
        if self.conv:
            cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
            n, d, t = cols.shape
            return cols.view(n, g, d // g, t).permute(0, 3, 1, 2).reshape(b, -1, g, d // g)
        return x.reshape(b, -1, 1, x.shape[-1])

    def _go(self, go: torch.Tensor) -> torch.Tensor:
        b, g = self.batch, self.groups
        if self.conv:
            n, o = go.shape[:2]
            return go.reshape(n, g, o // g, -1).permute(0, 3, 1, 2).reshape(b, -1, g, o // g)
        return go.reshape(b, -1, 1, go.shape[-1])

    def _instantiate(self) -> torch.Tensor:
        """(B, g, O/g, din): per-example gradients w.r.t. the effective weight, one batched
        matmul over (example, group) in channel-major layout (no copy of the patches for K=1)."""
        m, b, g, go = self.m, self.batch, self.groups, self.go
        if not self.conv:
            return (go.reshape(b, -1, go.shape[-1]).transpose(1, 2) @ self.rec.x.reshape(b, -1, self.rec.x.shape[-1])
                    ).unsqueeze(1)
        cols = F.unfold(self.rec.x, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)
        n, d, t = cols.shape
        k, o = n // b, go.shape[1]
        cols = cols.view(b, k, g, d // g, t).permute(0, 2, 3, 1, 4).reshape(b, g, d // g, k * t)
        gos = go.reshape(b, k, g, o // g, t).permute(0, 2, 3, 1, 4).reshape(b, g, o // g, k * t)
        return gos @ cols.transpose(-1, -2)

    def norms2(self) -> torch.Tensor:
        """Per-example squared norms (B,). Afterwards the rule keeps only what its clipped sum
        needs: per-example gradients (instantiated), or input and output gradient (ghost)."""
        b, go = self.batch, self.go
        total = torch.zeros(b, dtype=go.dtype, device=go.device)
        if self.m.bias is not None and self.m.bias.requires_grad:
            gb = go.reshape(b, -1, go.shape[1], go[0, 0].numel()).sum((1, 3)) if self.conv else \
                go.reshape(b, -1, go.shape[-1]).sum(1)                     # (B, O)
            total += _sq_norms(gb)
            self.per_example["bias"] = gb
        if not self.m.weight.requires_grad and not self._gain_trained():
            self.go = self.rec = None
            return total
        g = self.groups
        scale = None if self.ws is None else (self.ws[1] / self.ws[2]).view(g, -1)  # m/s, (g, O/g)
        if not self.ghost:
            self.grads = self._instantiate()                                  # (B, g, O/g, din)
            self.go = self.rec = None
            if scale is None:
                return total + _sq_norms(self.grads)
            sq = (torch.einsum("bgoj,bgoj->bgo", self.grads, self.grads) * scale.square()).sum((1, 2))
            w_hat = self.ws[0].view(g, -1, self.ws[0].shape[1])
            s1 = self.grads.sum(-1)                                          # (B, g, O/g)
            s2 = torch.einsum("bgoj,goj->bgo", self.grads, w_hat)
        else:
            go = self._go(go)
            gram_a = self._gram_a()
            if scale is None:
                gram_g = torch.einsum("bpgo,bqgo->bgpq", go, go)
                self.rec.out = None
                return total + (gram_a * gram_g).sum((1, 2, 3))
            gs = go * scale
            sq = (gram_a * torch.einsum("bpgo,bqgo->bgpq", gs, gs)).sum((1, 2, 3))  # sum_o (m/s)^2 |G_o|^2
            del gram_a, gs
            s1 = torch.einsum("bpgo,bpg->bgo", go, self._a_sum())
            s2 = torch.einsum("bpgo,bpgo->bgo", go, self._a_dot_w_hat(self.ws[0], self.ws[1]))
            self.rec.out = None
        # Through the standardisation: |dL/dw_o|^2 = (m/s)^2 (|G_o|^2 - S1^2/n - S2^2 (2n - |w_hat_o|^2)/n^2).
        w_hat = self.ws[0]
        n = w_hat.shape[1]
        w_hat_sq = w_hat.square().sum(1).view(g, -1)
        if self.m.weight.requires_grad:
            corr = (scale.square() * (s1.square() / n + s2.square() * (2 * n - w_hat_sq) / n ** 2)).sum((1, 2))
            total = total + sq - corr
        if self._gain_trained():
            gg = (s2 * self.m.scale).flatten(1)                              # dL/dgain_o = scale * S2_o
            total += _sq_norms(gg)
            self.per_example["gain"] = gg
        return total

    def _gain_trained(self) -> bool:
        return self.ws is not None and self.ws[3] is not None and self.m.gain.requires_grad

    def _padded(self) -> torch.Tensor:
        ph, pw = self.m.padding
        return F.pad(self.rec.x, (pw, pw, ph, ph)) if ph or pw else self.rec.x

    def _gram_a(self) -> torch.Tensor:
        """(B, g, P, P): a_p . a_q for all pairs of positions of each example.

        For a conv, without unfolding: a_p . a_q = sum over kernel offsets d of
        x[p + d] . x[q + d] on the padded input, read from the Gram matrix of its pixels
        (an example's K views are more pixels)."""
        if not self.conv:
            a = self._a()
            return torch.einsum("bpgj,bqgj->bgpq", a, a)
        m, b, g = self.m, self.batch, self.groups
        xp = self._padded()
        n, c, hp, wp = xp.shape
        k = n // b
        xv = xp.reshape(b, k, g, c // g, hp * wp).permute(0, 2, 3, 1, 4).reshape(b, g, c // g, k * hp * wp)
        pixels = xv.transpose(-1, -2) @ xv                                   # (B, g, KU, KU)
        ho, wo = self.go.shape[-2:]
        rows = torch.arange(ho, device=xp.device) * m.stride[0]
        cols = torch.arange(wo, device=xp.device) * m.stride[1]
        base = (rows[:, None] * wp + cols[None, :]).flatten()
        base = (torch.arange(k, device=xp.device)[:, None] * hp * wp + base[None, :]).flatten()  # (K T,)
        gram = None
        for i in range(m.kernel_size[0]):
            for j in range(m.kernel_size[1]):
                idx = base + i * m.dilation[0] * wp + j * m.dilation[1]
                part = pixels[:, :, idx[:, None], idx[None, :]]
                gram = part if gram is None else gram + part
        return gram

    def _a_sum(self) -> torch.Tensor:
        """(B, P, g): sum over each position's patch (a box filter for a conv, no unfold)."""
        if not self.conv:
            return self._a().sum(-1)
        m, g = self.m, self.groups
        xp = self._padded()
        n, c, hp, wp = xp.shape
        xs = xp.reshape(n, g, c // g, hp, wp).sum(2)
        ones = xs.new_ones(g, 1, *m.kernel_size)
        box = F.conv2d(xs, ones, stride=m.stride, dilation=m.dilation, groups=g)  # (N, g, Ho, Wo)
        return box.permute(0, 2, 3, 1).reshape(self.batch, -1, g)

    def _a_dot_w_hat(self, w_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """(B, P, g, O/g): a_p . w_hat_o, from the layer's output when m has no zero."""
        g = self.groups
        if bool((m != 0).all()):
            pre = self.rec.out.detach()
            if self.m.bias is not None:
                pre = pre - self.m.bias.detach().view(1, -1, *([1] * (pre.dim() - 2)))
            return self._go(pre / m.view(1, -1, *([1] * (pre.dim() - 2))))
        return torch.einsum("bpgj,goj->bpgo", self._a(), w_hat.view(g, -1, w_hat.shape[1]))

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        m = self.m
        out: dict[str, torch.Tensor] = {}
        if "bias" in self.per_example:
            out["bias"] = (c @ self.per_example["bias"]).view_as(m.bias)
        if "gain" in self.per_example:
            out["gain"] = (c @ self.per_example["gain"]).view_as(m.gain)
        if not m.weight.requires_grad:
            return out
        if not self.ghost:
            w_eff_grad = torch.einsum("b,bgoj->goj", c, self.grads).reshape(m.weight.shape)
        else:  # book-keeping: the weight gradient of (c * go), as in a non-private backward pass
            k = self.go.shape[0] // self.batch
            cgo = self.go * c.repeat_interleave(k).view(-1, *([1] * (self.go.dim() - 1)))
            if self.conv:
                w_eff_grad = torch.nn.grad.conv2d_weight(self.rec.x, m.weight.shape, cgo, stride=m.stride,
                                                         padding=m.padding, dilation=m.dilation, groups=m.groups)
            else:
                w_eff_grad = cgo.reshape(-1, cgo.shape[-1]).t() @ self.rec.x.reshape(-1, self.rec.x.shape[-1])
        if self.ws is None:
            out["weight"] = w_eff_grad
            return out
        # The clipped sum is linear in the per-example gradients: pull it back through the
        # standardisation once (the gain's part is computed above from S2).
        with torch.enable_grad():
            weight = m.weight.detach().requires_grad_(True)
            (out["weight"],) = torch.autograd.grad(_effective_weight(m, weight), weight, w_eff_grad)
        return out


class GroupNormRule:
    """GroupNorm's affine weight and bias: per-example gradients are (B, C), always instantiated."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str) -> None:
        self.m, self.batch = rec.module, batch
        x_hat = F.group_norm(rec.x, self.m.num_groups, eps=self.m.eps)
        b, c = batch, go.shape[1]
        self.per_example = {}
        if self.m.weight is not None and self.m.weight.requires_grad:
            self.per_example["weight"] = (go * x_hat).reshape(b, -1, c, go[0, 0].numel()).sum((1, 3))
        if self.m.bias is not None and self.m.bias.requires_grad:
            self.per_example["bias"] = go.reshape(b, -1, c, go[0, 0].numel()).sum((1, 3))

    def norms2(self) -> torch.Tensor:
        return sum(_sq_norms(v) for v in self.per_example.values())

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: c @ value for name, value in self.per_example.items()}


class ScalarGainRule:
    """y = x * g for a scalar g (NF blocks' skip-init gain): example b's gradient is
    sum over its views and positions of go * x, a (B,) vector."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str) -> None:
        self.m = rec.module
        self.per_example = {"gain": (go * rec.x).reshape(batch, -1).sum(1)}

    def norms2(self) -> torch.Tensor:
        return self.per_example["gain"] ** 2

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gain": c @ self.per_example["gain"]}


def _scalar_gain() -> type:
    from ..models.nfnet import ScalarGain

    return ScalarGain


SUPPORTED = (nn.Linear, nn.Conv2d, nn.GroupNorm)


def is_supported(module: nn.Module) -> bool:
    return (isinstance(module, SUPPORTED + (_scalar_gain(),))
            or type(module).__name__ in ("ScaledStdConv2d", "ScaledStdConv2dSame"))


def problem(module: nn.Module) -> Optional[str]:
    """Why the engine cannot give this layer's own parameters per-example gradients, or None."""
    if not is_supported(module):
        return f"no per-example rule for {type(module).__name__}"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}"
    return None


def rule_for(rec: Record, go: torch.Tensor, batch: int, mode: str):
    if isinstance(rec.module, nn.GroupNorm):
        return GroupNormRule(rec, go, batch, mode)
    if isinstance(rec.module, _scalar_gain()):
        return ScalarGainRule(rec, go, batch, mode)
    return DenseRule(rec, go, batch, mode)
