"""Per-layer rules of the dpwa-fast engine: per-example squared gradient norms and the
clipped sum of per-example gradients, from a layer's input and output gradient.

A rule is exact only for the computation it was derived for, so layers are matched by the
forward they run, never by `isinstance`: a registered class (`RULES`, `register_rule`), or a
subclass that inherits its forward unchanged. A subclass with its own forward (timm's
`StdConv2d` before it had a rule, a Linear with an extra scale) computes something else, and
is refused by name (`problem`) until a rule is registered for that exact class.

A dense layer (Linear, Conv2d, weight-standardised Conv2d, timm's StdConv2d and
ScaledStdConv2d) is seen as positions p (tokens, output pixels, and an example's K augmented
views, which are just more positions of the same example) and groups g: per example b the
weight gradient is G_b = sum_p go[b, p]^T a[b, p], a contraction over positions. Two ways to
get |G_b|^2:

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

A conv's weight gradient depends only on the input as the convolution sees it, so any padding
a forward does by hand (`padding_mode="reflect"`, `padding="same"`, timm's TF-style "SAME"
`pad_same`) is redone on the recorded input, exactly as that forward does it (`Layer.pad`).

Weight-standardised convs use w_eff = m * w_hat, w_hat = (w - mean) / sqrt(var + eps) per
output channel (Qiao et al. 2019; m = 1 for WSConv2d and timm's StdConv2d, gain * fan_in^-1/2
for timm's ScaledStdConv2d, Brock et al. 2021). The per-example gradient with respect to the
raw w is, per channel, (m/s) (G - mean(G) - w_hat mean(G w_hat)), the layer-norm backward; its
squared norm is, with n the fan-in, S1 = sum G and S2 = sum G w_hat:
(m/s)^2 (|G|^2 - S1^2/n - S2^2 (2n - |w_hat|^2)/n^2), and the gain's gradient is scale * S2
(m = gain * scale). The clipped sum, linear in the per-example gradients, is pulled back
through the standardisation once. S2 needs a_p . w_hat_o, which is the layer's own pre-bias
output over m.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Record", "Layer", "RULES", "register_rule", "layer_of", "rule_for", "is_supported", "problem",
           "Chunks", "terms2_of", "DenseRule", "GroupNormRule", "GroupNormActRule", "ScalarGainRule", "pad_module", "pad_functional",
           "pad_tf_same", "pad_always_same"]


@dataclass
class Record:
    """What a forward hook saw: the layer, its input and its output (N = B * K rows), and
    their version counters then: an in-place change later would corrupt the rule's inputs;
    reads_data: its input needs no gradient (it reads the data, not another layer)."""

    module: nn.Module
    x: torch.Tensor
    out: torch.Tensor
    version: int
    x_version: int = 0
    reads_data: bool = False
    #: What the rules of one layer's chunks of examples share within one step (`FastEngine._chunks`
    #: gives them one dict): values of the parameters alone, e.g. the standardised weight
    #: (`_ws_parts`), computed by the first chunk's rule. It lives one step, so it never outlives
    #: an update of the weights (a memo across steps would have to see every in-place change).
    shared: dict = field(default_factory=dict)
    #: dpwa-lean's rules: their norms meet a clipped sum of another computation (the second
    #: backward), so every rule gives `terms2`; a fast-mode rule only where its norm and its sum
    #: are two computations (ghost norm against the book-kept sum)
    lean: bool = False


@dataclass(frozen=True)
class Layer:
    """What dpwa-fast knows of one exact layer class.

    rule: builds the rule from (Record, output gradient, examples, mode, this Layer).
    params: the parameter names the rule gives per-example gradients for (any other is refused).
    standardise: None; "unit" (w_hat: WSConv2d, timm StdConv2d); "gain" (gain * scale * w_hat:
        timm ScaledStdConv2d).
    pad: convs only: (module, input) -> (the input with the padding the forward does by hand,
        the symmetric padding the convolution itself then applies).
    check: (module) -> why this instance cannot be handled, or None.
    """

    rule: Callable
    params: tuple[str, ...] = ("weight", "bias")
    standardise: Optional[str] = None
    pad: Optional[Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, tuple[int, int]]]] = None
    check: Optional[Callable[[nn.Module], Optional[str]]] = None


RULES: dict[type, Layer] = {}
_FORWARD = ("forward", "_conv_forward")  # nn.Conv2d.forward calls _conv_forward: both define the layer


def register_rule(cls: type, layer: Layer) -> None:
    """Give dpwa-fast a rule for exactly `cls` (and subclasses that keep its forward). A model
    module registers its own layers' rules, so that the engines never import the models."""
    RULES[cls] = layer


def _inside(offset: int, stride: int, n_out: int, n_in: int) -> Optional[tuple[slice, slice]]:
    """(output indices, input indices) along one axis of a conv whose output index t reads input
    index stride * t + offset, for the t where that lies inside [0, n_in); None if there are none."""
    lo = max(0, -(offset // stride))  # ceil(-offset / stride)
    hi = min(n_out, (n_in - 1 - offset) // stride + 1)
    if hi <= lo:
        return None
    return slice(lo, hi), slice(stride * lo + offset, stride * (hi - 1) + offset + 1, stride)


def _sq_norms(per_example: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """(B, ...) -> (B,) squared L2 norms (or over the one dimension `dim`), without a squared
    copy of the input. A norm reduction, not a dot product: einsum("bi,bi->b") runs as a batch of
    matrix-vector products, several times slower on whole per-example gradients and with a
    float32 error that grows with their length."""
    if dim is None:
        per_example = per_example.reshape(per_example.shape[0], -1)
        dim = 1
    return torch.linalg.vector_norm(per_example, dim=dim).square()


@dataclass(frozen=True)
class Standardised:
    """A weight-standardised conv's weight: w_hat (O, n), the multiplier m (O,) of w_eff = m w_hat,
    the per-channel std s (O,), the gain's parameter name (or None), and what every rule
    reads of them: m/s and |w_hat_o|^2 (O,)."""

    w_hat: torch.Tensor
    m: torch.Tensor
    s: torch.Tensor
    gain: Optional[str]
    scale: torch.Tensor
    w_hat_sq: torch.Tensor


#: A standardised conv's weight term below this fraction of sum_o (m/s)^2 |G_o|^2 is recomputed in
#: float64 (`_exact_ws_terms`): cancelling over 99% of it leaves float32's rounding at ~1e-5 of the result.
_CANCELLED = 1e-2


def _ws_parts(module: nn.Module, standardise: Optional[str]) -> Optional[Standardised]:
    """The standardisation of the weight as it is now, for standardised convs, else None.

    Two passes (mean, then the mean square of the centred weight): as exact as torch.var and
    2-7x faster on these (O, n) shapes, whose per-row Welford reduction is slow."""
    if standardise is None:
        return None
    w = module.weight.detach().flatten(1)
    if standardise == "gain":
        m, gain = (module.gain.detach() * module.scale).flatten(), "gain"
    else:
        m, gain = torch.ones(w.shape[0], dtype=w.dtype, device=w.device), None
    centred = w - w.mean(1, keepdim=True)
    s = torch.sqrt(centred.square().mean(1) + module.eps)
    w_hat = centred / s.unsqueeze(1)
    return Standardised(w_hat, m, s, gain, m / s, w_hat.square().sum(1))


def _shared_ws_parts(rec: Record, standardise: Optional[str]) -> Optional[Standardised]:
    """`_ws_parts`, once per layer and step: the chunks of one layer's examples share it."""
    if "ws" not in rec.shared:
        rec.shared["ws"] = _ws_parts(rec.module, standardise)
    return rec.shared["ws"]


def _effective_weight(module: nn.Module, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """The weight the layer convolves with, m * w_hat, as a function of a raw weight `w` (m fixed);
    timm's own formulation (timm.layers.std_conv), equal to `dpwa.models.ws.standardize` for m = 1."""
    return F.batch_norm(w.reshape(1, w.shape[0], -1), None, None, weight=m, training=True, momentum=0.0,
                        eps=module.eps).reshape_as(w)


# -- how each conv's forward pads its input -------------------------------------------------
def pad_module(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """nn.Conv2d._conv_forward: F.pad with the padding mode unless it is zeros; padding="same"
    pads asymmetrically (left d(k-1)//2, right the rest), as `_reversed_padding_repeated_twice` says."""
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), (0, 0)
    return pad_functional(m, x)


def pad_functional(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """A forward that calls F.conv2d(x, w, b, m.stride, m.padding, ...): padding_mode is ignored."""
    if isinstance(m.padding, str):  # "same" ("valid" is (0, 0) already)
        return (F.pad(x, m._reversed_padding_repeated_twice), (0, 0)) if m.padding == "same" else (x, (0, 0))
    return x, tuple(m.padding)


def pad_tf_same(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """timm's *Same convs (StdConv2dSame, ScaledStdConv2dSame): TF "SAME" padding by hand when it
    cannot be static (`same_pad`, timm.layers.padding.pad_same), then F.conv2d with m.padding."""
    if getattr(m, "same_pad", False):
        from timm.layers.padding import pad_same

        x = pad_same(x, m.kernel_size, m.stride, m.dilation)
    return pad_functional(m, x)


def pad_always_same(m: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """timm's Conv2dSame (timm.layers.conv2d_same): pad_same always, then no padding."""
    from timm.layers.padding import pad_same

    return pad_same(x, m.kernel_size, m.stride, m.dilation), (0, 0)


#: dpwa-fast instantiates a layer's per-example gradients only while they take at most this
#: many times the layer's input and output gradient (which ghost norm holds instead).
_INSTANTIATE_MEMORY = 3
#: The speed of ghost norm's parts and of per-example conv gradients, relative to the dense
#: weight gradient's multiply-adds: fitted to the per-layer times of
#: `python experiments/bench_layer_rules.py` (2 CPU threads, oneDNN and OpenBLAS; WRN-16-4's and
#: the tanh CNN's conv shapes at 16-256 examples, K = 1 and 4, each option on cache-sized chunks of
#: examples as `FastEngine` runs it; experiments/results/bench_layer_rules.md).
_GRAM_MATMUL = 2.1   # a Gram matrix's multiply-add (batched matmul of small matrices)
_GRAM_ENTRY = 24     # one pass over a Gram entry (strided adds of the offsets, the final dot)


def _grouped_slowdown(positions: int, in_channels: int) -> float:
    """Per-example conv gradients as one convolution grouped by example, on a cache-sized chunk
    of examples: near the dense kernel's speed for many positions per example and input
    channels per group, ~1.5x at 256 positions, ~3.7x at 64; 6-9x with 3 input channels (oneDNN)."""
    return max(1.0, 0.76 + 188 / positions) + 60 / in_channels ** 2


def _shifted_slowdown(positions: int, in_channels: int, kernel: tuple[int, int]) -> float:
    """Per-example conv gradients offset by offset (`DenseRule._instantiate_shifted`): one GEMM
    per offset, slower the fewer positions and input channels (smaller matrices); a 1x1 kernel's
    single GEMM runs near the dense weight gradient (itself slow for 1x1)."""
    return 1.5 if kernel == (1, 1) else 1.0 + 225 / positions + 16 / in_channels


def _unfolded_slowdown(positions: int, din: int) -> float:
    """Per-example conv gradients as one batched matmul with the unfolded patches
    (`DenseRule._instantiate_unfolded`): it writes k^2 copies of the input, and its matmuls are
    small for few positions per example (10-16x the dense time at 8x8), so it pays only where a
    patch is short (a first layer's few input channels, din = C kh kw): 4x the dense time at
    C = 3, where the grouped and shifted kernels run 5-10x; 2.5-3x at C = 16 with a 3x3 kernel,
    where the grouped kernel runs 1.5x."""
    return 2.2 + 600 / positions + 50 / din


def _diagonal_terms(gram_a: torch.Tensor, gram_g: torch.Tensor) -> torch.Tensor:
    """(B,) sum_p |a_p|^2 |go_p|^2 from ghost norm's Gram matrices (B, g, P, P): `terms2`."""
    return (gram_a.diagonal(dim1=-2, dim2=-1) * gram_g.diagonal(dim1=-2, dim2=-1)).sum((1, 2))


class DenseRule:
    """Linear and (grouped, strided, padded, dilated) Conv2d, plain or weight-standardised, as
    its `Layer` says (standardisation, and the padding its forward does by hand)."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str, layer: Layer) -> None:
        self.rec, self.m, self.batch = rec, rec.module, batch
        self.conv = layer.pad is not None
        self.groups = self.m.groups if self.conv else 1
        if self.conv:  # the input as the conv sees it: any padding its forward does by hand, done here
            rec.x, self.padding = layer.pad(self.m, rec.x)
        self.go = go
        self.ws = _shared_ws_parts(rec, layer.standardise)
        o, din = self.m.weight.shape[0], self.m.weight[0].numel()
        k = go.shape[0] // batch
        positions = go[0].numel() // o * k
        # Costs per example in multiply-adds of the dense weight gradient (its kernel's speed),
        # with factors fitted to experiments/bench_layer_rules.py. Ghost norm: its Gram matrices'
        # multiply-adds (_GRAM_MATMUL times slower) and, per Gram entry, one add per kernel offset
        # and two more (_GRAM_ENTRY times slower: strided, memory-bound). For a conv, the pixel
        # Gram of the unpadded input (KU)^2 C (`_gram_a`), then the output gradient's P^2 O.
        kk = self.m.weight[0, 0].numel() if self.conv else 1
        if self.conv:
            u = k * rec.x.shape[-2] * rec.x.shape[-1]
            gram = _GRAM_MATMUL * (u * u * rec.x.shape[1] + positions * positions * o)
        else:
            gram = _GRAM_MATMUL * positions * positions * (din + o)
        gram += _GRAM_ENTRY * (kk + 2) * positions * positions * self.groups
        # Instantiation: the per-example gradients' kernel, slower per multiply-add than the dense
        # one, the fastest of grouped by example (`_grouped_slowdown`), offset by offset where that
        # applies (`_instantiate_shifted`, `_shifted_slowdown`) and unfolded patches
        # (`_instantiate_unfolded`, `_unfolded_slowdown`).
        self.how, slowdown = "grouped", 1.0
        if self.conv:
            options = {"grouped": _grouped_slowdown(positions, rec.x.shape[1] // self.groups),
                       "unfolded": _unfolded_slowdown(positions, din)}
            if self._shiftable():
                options["shifted"] = _shifted_slowdown(positions, rec.x.shape[1], tuple(self.m.kernel_size))
            self.how = min(options, key=options.get)
            slowdown = options[self.how]
        self.ghost = mode == "ghost" or (mode != "instantiate" and self._ghost_cheaper(
            gram=gram, weight_grad=positions * din * o, slowdown=slowdown, grads=o * din,
            held=(rec.x[0].numel() + go[0].numel()) * k, norms_only=mode == "auto-norms"))
        self.how = "ghost" if self.ghost else self.how  # ghost, or how the per-example gradients are formed
        self.shifted = self.how == "shifted"
        self.per_example: dict[str, torch.Tensor] = {}
        g = self.groups
        if self.ghost:  # the Gram matrices (and, for a conv, the padded input's pixel Gram)
            self._transient = 2 * g * positions * positions + (g * u * u if self.conv else 0)
        elif self.shifted:  # the per-example gradients, the input channels-last and the padded output gradient
            grid = k * (rec.x.shape[-2] + 2 * self.padding[0]) * (rec.x.shape[-1] + 2 * self.padding[1])
            self._transient = o * din + grid * (rec.x.shape[1] + o)
        elif self.how == "unfolded":  # the per-example gradients and the unfolded patches
            self._transient = o * din + positions * din * g
        else:           # the per-example gradients, and for a conv with K views, its input and output gradient regrouped
            self._transient = o * din + (rec.x[0].numel() * k + o * positions if self.conv and k > 1 else 0)

    @staticmethod
    def _ghost_cheaper(*, gram: int, weight_grad: int, slowdown: float, grads: int, held: int,
                       norms_only: bool) -> bool:
        """The mixed rule (Bu et al. 2022) from multiply-adds per example: ghost norm costs its
        Gram matrices (`gram`); instantiation costs one weight gradient grouped by example
        (`weight_grad` x `slowdown`) and a pass over the per-example gradients (`grads`) for
        their norms. When the clipped sum is book-kept (dpwa-fast), ghost norm also pays a dense
        weight gradient for it, instantiation only a pass over its per-example gradients.
        Instantiation is chosen only while its per-example gradients take at most
        _INSTANTIATE_MEMORY times what ghost norm holds for the layer until the clip factors
        are known (its input and output gradient, `held`), so that the default mode's memory
        stays near the non-private one's. dpwa-lean (`norms_only`) keeps nothing: the cheaper
        norm wins.
        """
        if norms_only:
            return gram < weight_grad * slowdown + grads
        return gram + weight_grad < weight_grad * slowdown + 2 * grads or grads > _INSTANTIATE_MEMORY * held

    def transient(self) -> int:
        """Elements per example that `norms2` allocates on top of its inputs (the lean mode
        sizes its chunks of examples by it)."""
        return self._transient

    # -- layout: a (B, P, g, din), go (B, P, g, dout) -------------------------------------
    def _unfold(self) -> torch.Tensor:
        """A conv's patches (N, C kh kw, P), as the convolution reads its input."""
        m = self.m
        return F.unfold(self.rec.x, m.kernel_size, dilation=m.dilation, padding=self.padding, stride=m.stride)

    def _a(self) -> torch.Tensor:
        x, b, g = self.rec.x, self.batch, self.groups
        if self.conv:
            cols = self._unfold()
            n, d, t = cols.shape
            return cols.view(n, g, d // g, t).permute(0, 3, 1, 2).reshape(b, -1, g, d // g)
        return x.reshape(b, -1, 1, x.shape[-1])

    def _go(self, go: torch.Tensor) -> torch.Tensor:
        """(B, g, O/g, P): an output(-shaped) gradient channels first, a view of a conv's
        (N, O, H, W) unless an example has K > 1 views (whose positions are then put together)."""
        b, g = self.batch, self.groups
        if self.conv:
            n, o = go.shape[:2]
            k = n // b
            if k == 1:
                return go.reshape(b, g, o // g, -1)
            return go.reshape(b, k, g, o // g, -1).permute(0, 2, 3, 1, 4).reshape(b, g, o // g, -1)
        return go.reshape(b, -1, 1, go.shape[-1]).permute(0, 2, 3, 1)

    def _instantiate(self) -> torch.Tensor:
        """(B, g, O/g, din): per-example gradients w.r.t. the effective weight.

        A linear layer's are one batched matmul. A conv's are the weight gradient of one
        convolution whose groups are (example, group) pairs: the examples' channels side by
        side, their K views as its batch (summed, as one example's views are). That is the
        non-private backward's own kernel, at its cost (2.3x faster than unfolding patches for a
        bmm, which copies k^2 times the input; `experiments/bench_dp_step.py`).
        """
        b, g, go = self.batch, self.groups, self.go
        if not self.conv:
            return (go.reshape(b, -1, go.shape[-1]).transpose(1, 2) @ self.rec.x.reshape(b, -1, self.rec.x.shape[-1])
                    ).unsqueeze(1)
        if self.shifted:
            return self._instantiate_shifted()
        if self.how == "unfolded":
            return self._instantiate_unfolded()
        x = self.rec.x
        n, c = x.shape[:2]
        k, o = n // b, go.shape[1]
        xs = x.reshape(b, k, c, *x.shape[2:]).transpose(0, 1).reshape(k, b * c, *x.shape[2:])
        gos = go.reshape(b, k, o, *go.shape[2:]).transpose(0, 1).reshape(k, b * o, *go.shape[2:])
        return self._conv_weight_grad(xs, gos, b).reshape(b, g, o // g, -1)

    def _instantiate_unfolded(self) -> torch.Tensor:
        """(B, g, O/g, din): per-example gradients as batched matmuls of the unfolded patches with
        the output gradient, a_b^T (din, P) @ go_b (P, O/g) per example and group (in this order
        1.4x faster than go_b^T a_b, whose transpose it is), an example's K views added one view
        at a time (no regrouped copy). Unfolding copies each input pixel k^2 times: cheap only for
        short patches, where the grouped kernel is slowest (`_unfolded_slowdown`)."""
        b, g, go = self.batch, self.groups, self.go
        cols = self._unfold()
        n, d, p = cols.shape
        k, o = n // b, go.shape[1]
        cols = cols.view(b, k, g, d // g, p)                         # (B, K, g, din, P)
        gos = go.reshape(b, k, g, o // g, p).transpose(-1, -2)       # (B, K, g, P, O/g)
        out = cols[:, 0] @ gos[:, 0]
        for v in range(1, k):
            out += cols[:, v] @ gos[:, v]
        return out.transpose(-1, -2)

    def _shiftable(self) -> bool:
        """A conv `_instantiate_shifted` handles: one group, and stride 1 or a 1x1 kernel without padding."""
        m = self.m
        return m.groups == 1 and (tuple(m.stride) == (1, 1) or
                                  (tuple(m.kernel_size) == (1, 1) and tuple(self.padding) == (0, 0)))

    def _instantiate_shifted(self) -> torch.Tensor:
        """(kh kw, B, O, C): a one-group conv's per-example gradients, one batched matmul per
        kernel offset, for stride 1.

        On the padded input's grid (width Wp), output pixel p reads input pixel p + d for kernel
        offset (i, j), d = i dil_h Wp + j dil_w. With the input's pixels flattened channels-last,
        the pixels an offset reads are a window of rows, a plain matrix (no unfolded patches); the
        output gradient padded with zeros to the same grid meets it in one GEMM per offset,
        go^T (O, KU) @ x[d:] (KU, C), an example's K views as more rows. That is the dense weight
        gradient's work (on the padded grid), where the grouped kernel of `_instantiate` slows down
        with fewer positions per example (1.5-3.7x the dense time at 256-64 positions, `_grouped_slowdown`). A 1x1
        kernel of stride s reads every s-th pixel: those are the grid."""
        m, b, go = self.m, self.batch, self.go
        x = self._padded()
        if tuple(m.stride) != (1, 1):
            x = x[..., ::m.stride[0], ::m.stride[1]]
        n, c, hp, wp = x.shape
        o, ho, wo = go.shape[1:]
        k, u = n // b, hp * wp
        xf = x.permute(0, 2, 3, 1).reshape(b, k * u, c)
        gp = F.pad(go, (0, wp - wo, 0, hp - ho)).reshape(b, k, o, u)
        gp = gp.reshape(b, o, u) if k == 1 else gp.transpose(1, 2).reshape(b, o, k * u)
        kh, kw = m.kernel_size
        out = go.new_empty(kh * kw, b, o, c)
        for i in range(kh):
            for j in range(kw):
                d = i * m.dilation[0] * wp + j * m.dilation[1]
                # rows past k u - d of the output gradient are padding (zeros): every real output
                # pixel's input pixel lies in its own view
                torch.bmm(gp[:, :, :k * u - d], xf[:, d:], out=out[i * kw + j])
        return out

    def _conv_weight_grad(self, x: torch.Tensor, go: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """The conv's weight gradient for input x and output gradient go, the non-private
        backward's kernel; `copies` side-by-side copies of the layer (its groups repeated)."""
        m = self.m
        return torch.nn.grad.conv2d_weight(x, (copies * m.weight.shape[0], *m.weight.shape[1:]), go, stride=m.stride,
                                           padding=self.padding, dilation=m.dilation, groups=copies * m.groups)

    def norms2(self) -> torch.Tensor:
        """Per-example squared norms (B,). Afterwards the rule keeps only what its clipped sum
        needs: per-example gradients (instantiated), or input and output gradient (ghost)."""
        b, go = self.batch, self.go
        # `terms2`: all of it in dpwa-lean; in the fast mode only ghost norm's (below, free from
        # its Gram matrices' diagonals), as an instantiated gradient's norm and clipped sum are of
        # one tensor, and a standardised one's projection (sq against its norm)
        self.terms2 = self._terms2() if self.rec.lean else None
        fast = not self.rec.lean
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
        scale = None if self.ws is None else self.ws.scale.view(g, -1)  # m/s, (g, O/g)
        if not self.ghost:
            self.grads = self._instantiate()           # (B, g, O/g, din), or (kh kw, B, O, C) if shifted
            self.go = self.rec = None
            if scale is None:
                return total + (sum(_sq_norms(part) for part in self.grads) if self.shifted else _sq_norms(self.grads))
            sq = (self._grad_dots(None) * scale.square()).sum((1, 2))
            if fast:
                self.terms2 = sq
            s1 = self.grads.sum((0, 3)).unsqueeze(1) if self.shifted else self.grads.sum(-1)  # (B, g, O/g)
            s2 = self._grad_dots(self.ws.w_hat.view(g, -1, self.ws.w_hat.shape[1]))
        else:
            go = self._go(go)                                                # (B, g, O/g, P)
            gram_a = self._gram_a()
            if scale is None:
                gram_g = torch.einsum("bgop,bgoq->bgpq", go, go)
                self.rec.out = None
                if fast:
                    self.terms2 = _diagonal_terms(gram_a, gram_g)
                return total + torch.einsum("bgpq,bgpq->b", gram_a, gram_g)
            gram_g = torch.einsum("bgop,bgoq->bgpq", go * scale.square().unsqueeze(-1), go)
            sq = torch.einsum("bgpq,bgpq->b", gram_a, gram_g)                # sum_o (m/s)^2 |G_o|^2
            if fast:
                self.terms2 = _diagonal_terms(gram_a, gram_g)
            del gram_a, gram_g
            s1 = torch.einsum("bgop,bpg->bgo", go, self._a_sum())
            s2 = torch.einsum("bgop,bgop->bgo", go, self._a_dot_w_hat(self.ws.w_hat, self.ws.m))
            self.rec.out = None
        # Through the standardisation: |dL/dw_o|^2 = (m/s)^2 (|G_o|^2 - S1^2/n - S2^2 (2n - |w_hat_o|^2)/n^2).
        if self.m.weight.requires_grad:
            weight = sq - self._ws_correction(s1, s2)
            if weight.dtype != torch.float64:  # the terms nearly cancel: redo those examples in float64
                for i in (weight < _CANCELLED * sq).nonzero().flatten().tolist():
                    sq_i, s1_i, s2_i = self._exact_ws_terms(i)
                    weight[i] = float(sq_i - self._ws_correction(s1_i, s2_i))
                    s2[i] = s2_i.to(s2.dtype)
            total = total + weight
        if self._gain_trained():
            gg = (s2 * self.m.scale).flatten(1)                              # dL/dgain_o = scale * S2_o
            total += _sq_norms(gg)
            self.per_example["gain"] = gg
        return total

    def _terms2(self) -> torch.Tensor:
        """(B,) sum over positions p of |a_p|^2 |go_p|^2 (per group, each output channel weighted
        as the norm weighs it), plus |go_p|^2 for a bias: the squared norm the per-example
        gradient, a sum over positions, would have if its positions' terms did not cancel.
        `FastEngine` compares the norm with it (`cancels`): a norm far below it is a difference
        of large terms, which float32 rounds to noise."""
        b, g, go, x = self.batch, self.groups, self.go, self.rec.x
        terms = torch.zeros(b, dtype=go.dtype, device=go.device)
        if self.m.bias is not None and self.m.bias.requires_grad:
            terms += go.square().reshape(b, -1).sum(1)
        if not self.m.weight.requires_grad and not self._gain_trained():
            return terms
        weight = None  # per output channel: (m/s)^2 for a standardised weight, plus the gain's part
        if self.ws is not None:
            weight = self.ws.scale.square() if self.m.weight.requires_grad else torch.zeros_like(self.ws.scale)
            if self._gain_trained():  # |dL/dgain_o| <= scale sum_p |go_p,o| |a_p| |w_hat_o|
                weight = weight + self.m.scale ** 2 * self.ws.w_hat_sq
        if self.conv:
            gsq = go.square() if weight is None else go.square() * weight.view(1, -1, 1, 1).to(go.dtype)
            n, o = gsq.shape[:2]
            gsq = gsq.reshape(n, g, o // g, *gsq.shape[2:]).sum(2)                        # (N, g, Ho, Wo)
            xsq = x.square().reshape(n, g, x.shape[1] // g, *x.shape[2:]).sum(2)         # (N, g, H, W)
            m = self.m
            asq = F.conv2d(xsq, xsq.new_ones(g, 1, *m.kernel_size), stride=m.stride, padding=self.padding,
                           dilation=m.dilation, groups=g)                                # |a_p|^2 per group
            return terms + (asq * gsq).reshape(b, -1).sum(1)
        gsq = go.square() if weight is None else go.square() * weight.to(go.dtype)
        return terms + (x.square().sum(-1) * gsq.sum(-1)).reshape(b, -1).sum(1)

    def _ws_correction(self, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
        """sum_o (m/s)^2 (S1^2/n + S2^2 (2n - |w_hat_o|^2)/n^2) for (..., g, O/g) sums, in their dtype."""
        ws, n = self.ws, self.ws.w_hat.shape[1]
        scale = ws.scale.view(self.groups, -1).to(s1.dtype)
        w_hat_sq = ws.w_hat_sq.view(self.groups, -1).to(s1.dtype)
        return (scale.square() * (s1.square() / n + s2.square() * (2 * n - w_hat_sq) / n ** 2)).sum((-2, -1))

    def _exact_ws_terms(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Example i's sum_o (m/s)^2 |G_o|^2, S1 and S2 in float64, from its weight gradient G
        (g, O/g, n) with respect to the standardised weight. An input whose patches have a large
        mean next to their spread (a constant image; features far from zero) puts nearly all of
        |G|^2 into S1^2/n, and float32 rounding of the difference then lost up to a quarter of
        the norm (the clip factor let the example exceed C); G in the working dtype has its
        entries to relative 1e-7, and these sums of it in float64 keep the difference to ~1e-7
        of |G| instead of ~1e-7 of |G|^2 / |dL/dw|."""
        g, ws = self.groups, self.ws
        if self.ghost:  # this example's weight gradient, from its rows of input and output gradient
            k = self.go.shape[0] // self.batch
            rows = slice(i * k, (i + 1) * k)
            G = self._conv_weight_grad(self.rec.x[rows].double(), self.go[rows].double())
        elif self.shifted:  # (kh kw, B, O, C) -> (O, C kh kw)
            G = self.grads[:, i].permute(1, 2, 0).double()
        else:
            G = self.grads[i].double()
        G = G.reshape(g, -1, ws.w_hat.shape[1])
        scale = ws.scale.view(g, -1).double()
        w_hat = ws.w_hat.view(g, -1, ws.w_hat.shape[1]).double()
        return (scale.square() * G.square().sum(-1)).sum(), G.sum(-1), (G * w_hat).sum(-1)

    def _grad_dots(self, w: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, g, O/g): each output channel's per-example gradient dotted with w (g, O/g, din), or
        with itself (w None), in either layout of the instantiated gradients."""
        grads = self.grads
        if not self.shifted:
            return _sq_norms(grads, -1) if w is None else torch.linalg.vecdot(grads, w.unsqueeze(0))
        kk, _, o, c = grads.shape
        w = None if w is None else w.view(o, c, kk)  # din is (C, kh, kw)
        return sum(_sq_norms(part, -1) if w is None else torch.linalg.vecdot(part, w[..., t])
                   for t, part in enumerate(grads)).unsqueeze(1)

    def _gain_trained(self) -> bool:
        return self.ws is not None and self.ws.gain is not None and self.m.gain.requires_grad

    def _padded(self) -> torch.Tensor:
        ph, pw = self.padding
        return F.pad(self.rec.x, (pw, pw, ph, ph)) if ph or pw else self.rec.x

    def _gram_a(self) -> torch.Tensor:
        """(B, g, P, P): a_p . a_q for all pairs of positions of each example.

        For a conv, without unfolding: a_p . a_q = sum over kernel offsets d of
        x[p + d] . x[q + d] on the padded input, read from the Gram matrix of its pixels
        (an example's K views are more pixels). Padding is zeros, so the Gram of the unpadded
        pixels is enough: offset d adds to the pairs of output pixels whose input pixels p + d,
        q + d both lie inside (a rectangle of output rows and columns, `_inside`), a strided
        slice of the pixel Gram seen as (B, g, K, H, W, K, H, W), no gather and no padded copy."""
        if not self.conv:
            a = self._a()
            return torch.einsum("bpgj,bqgj->bgpq", a, a)
        m, b, g = self.m, self.batch, self.groups
        x = self.rec.x
        n, c, h, w = x.shape
        k = n // b
        xv = x.reshape(b, k, g, c // g, h * w).permute(0, 2, 3, 1, 4).reshape(b, g, c // g, k * h * w)
        pix = (xv.transpose(-1, -2) @ xv).view(b, g, k, h, w, k, h, w)      # (B, g, KU, KU)
        ho, wo = self.go.shape[-2:]
        blocks = []
        for i in range(m.kernel_size[0]):
            rows = _inside(i * m.dilation[0] - self.padding[0], m.stride[0], ho, h)
            for j in range(m.kernel_size[1]):
                cols = _inside(j * m.dilation[1] - self.padding[1], m.stride[1], wo, w)
                if rows and cols:
                    blocks.append((rows, cols))
        # an offset whose inputs cover every output pixel (a "same" conv's centre) starts the sum
        full = [bl for bl in blocks if bl[0][0] == slice(0, ho) and bl[1][0] == slice(0, wo)]
        if full:
            (_, ih), (_, iw) = full[0]
            blocks.remove(full[0])
            gram = pix[:, :, :, ih, iw, :, ih, iw]  # may be all of pix: a copy, if more blocks read pix
            gram = gram.clone(memory_format=torch.contiguous_format) if blocks else gram.contiguous()
        else:
            gram = pix.new_zeros(b, g, k, ho, wo, k, ho, wo)
        for (oh, ih), (ow, iw) in blocks:
            gram[:, :, :, oh, ow, :, oh, ow] += pix[:, :, :, ih, iw, :, ih, iw]
        return gram.view(b, g, k * ho * wo, k * ho * wo)

    def _a_sum(self) -> torch.Tensor:
        """(B, P, g): sum over each position's patch (a box filter for a conv, no unfold)."""
        if not self.conv:
            return self._a().sum(-1)
        m, g = self.m, self.groups
        x = self.rec.x
        n, c = x.shape[:2]
        xs = x.reshape(n, g, c // g, *x.shape[2:]).sum(2)
        ones = xs.new_ones(g, 1, *m.kernel_size)
        box = F.conv2d(xs, ones, stride=m.stride, padding=self.padding, dilation=m.dilation, groups=g)  # (N, g, Ho, Wo)
        return box.permute(0, 2, 3, 1).reshape(self.batch, -1, g)

    def _a_dot_w_hat(self, w_hat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """(B, g, O/g, P): a_p . w_hat_o, from the layer's output when it was kept and m has
        no zero; else the layer's own contraction with w_hat (dpwa-lean does not keep outputs:
        one more convolution, instead of every standardised layer's output held)."""
        g = self.groups
        if self.rec.out is None:
            if self.conv:
                pre = F.conv2d(self.rec.x, w_hat.view_as(self.m.weight), stride=self.m.stride, padding=self.padding,
                               dilation=self.m.dilation, groups=g)
            else:
                pre = self.rec.x @ w_hat.t()
            return self._go(pre)
        shape = (1, -1, *([1] * (self.rec.out.dim() - 2)))
        pre = self.rec.out.detach()
        if self.m.bias is not None:
            pre = pre - self.m.bias.detach().view(shape)
        s2 = pre / m.view(shape)
        # one host sync: m has no zero, and out - bias has not lost a . w_hat to rounding, ~eps
        # |bias| / |m| of it, where m is small next to the bias (an NF conv's gain near 0; 1e-6
        # took float32 to ~1e-1); else the contraction itself (a zero m makes bias / m inf: too)
        usable = (m != 0).all()
        if self.m.bias is not None:
            usable &= ((self.m.bias.detach() / m).abs() <= 1e2 * s2.abs().mean().clamp_min(1e-30)).all()
        if bool(usable):
            return self._go(s2)
        return torch.einsum("bpgj,goj->bgop", self._a(), w_hat.view(g, -1, w_hat.shape[1]))

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.finish(self.partial_sum(c))

    def partial_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clipped sum with the weight's part still w.r.t. the effective weight (`finish`
        pulls it back through a standardisation): linear in c, so chunks of examples add."""
        m = self.m
        out: dict[str, torch.Tensor] = {}
        if "bias" in self.per_example:
            out["bias"] = (c @ self.per_example["bias"]).view_as(m.bias)
        if "gain" in self.per_example:
            out["gain"] = (c @ self.per_example["gain"]).view_as(m.gain)
        if not m.weight.requires_grad:
            return out
        if self.shifted:  # (kh kw, B, O, C) -> (O, C, kh, kw)
            kk, b, o, ci = self.grads.shape
            w_eff_grad = (c @ self.grads.view(kk, b, -1)).view(*m.kernel_size, o, ci).permute(2, 3, 0, 1).contiguous()
        elif not self.ghost:
            w_eff_grad = torch.einsum("b,bgoj->goj", c, self.grads).reshape(m.weight.shape)
        else:  # book-keeping: the weight gradient of (c * go), as in a non-private backward pass
            k = self.go.shape[0] // self.batch
            cgo = self.go * c.repeat_interleave(k).view(-1, *([1] * (self.go.dim() - 1)))
            if self.conv:
                w_eff_grad = self._conv_weight_grad(self.rec.x, cgo)
            else:
                w_eff_grad = cgo.reshape(-1, cgo.shape[-1]).t() @ self.rec.x.reshape(-1, self.rec.x.shape[-1])
        out["weight"] = w_eff_grad
        return out

    def finish(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The clipped sum from `partial_sum`s (added over chunks of examples): linear in the
        per-example gradients, so pulled back through the standardisation once (the gain's part
        is computed from S2 already)."""
        if self.ws is None or "weight" not in parts:
            return parts
        m, out = self.m, dict(parts)
        with torch.enable_grad():
            weight = m.weight.detach().requires_grad_(True)
            (out["weight"],) = torch.autograd.grad(_effective_weight(m, weight, self.ws.m), weight, parts["weight"])
        return out


class GroupNormRule:
    """GroupNorm's affine weight and bias: with x_hat the normalised input, example b's
    gradients are sums over its positions of go * x_hat and of go, per channel: (B, C),
    always instantiated."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str, layer: Layer) -> None:
        self.m, self.batch = rec.module, batch
        x_hat = F.group_norm(rec.x, self.m.num_groups, eps=self.m.eps)
        go = self._norm_output_grad(rec, go)
        b, c = batch, go.shape[1]
        self.per_example = {}
        # dpwa-lean only (`Record.lean`): the fast mode sums these very per-example gradients
        self.terms2 = go.new_zeros(b) if rec.lean else None  # as `DenseRule._terms2`
        if self.m.weight is not None and self.m.weight.requires_grad:
            terms = go * x_hat
            self.per_example["weight"] = terms.reshape(b, -1, c, go[0, 0].numel()).sum((1, 3))
            if rec.lean:
                self.terms2 += terms.square().reshape(b, -1).sum(1)
        if self.m.bias is not None and self.m.bias.requires_grad:
            self.per_example["bias"] = go.reshape(b, -1, c, go[0, 0].numel()).sum((1, 3))
            if rec.lean:
                self.terms2 += go.square().reshape(b, -1).sum(1)

    def _norm_output_grad(self, rec: Record, go: torch.Tensor) -> torch.Tensor:
        return go  # the layer's output is the group norm's

    def norms2(self) -> torch.Tensor:
        return sum(_sq_norms(v) for v in self.per_example.values())

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: c @ value for name, value in self.per_example.items()}


class GroupNormActRule(GroupNormRule):
    """timm's GroupNormAct and GroupNorm1Act (timm.layers.norm_act): act(drop(group_norm(x))) in
    one module, so the hook sees the activation's output. The group norm's output gradient is
    the activation's vector-Jacobian product, recomputed from the group norm's output (cheap,
    elementwise; on a copy, so an in-place activation is harmless). `drop` must be Identity:
    a random drop could not be recomputed (`_check_norm_act`)."""

    def _norm_output_grad(self, rec: Record, go: torch.Tensor) -> torch.Tensor:
        m = self.m
        weight = None if m.weight is None else m.weight.detach()
        bias = None if m.bias is None else m.bias.detach()
        with torch.enable_grad():
            z = F.group_norm(rec.x, m.num_groups, weight, bias, m.eps).requires_grad_(True)
            (gz,) = torch.autograd.grad(m.act(m.drop(z.clone())), z, go)
        return gz


def _check_norm_act(m: nn.Module) -> Optional[str]:
    if not isinstance(m.drop, nn.Identity):
        return f"{type(m).__name__} with drop layer {type(m.drop).__name__} (random in training; no rule)"
    return None


class ScalarGainRule:
    """y = x * g for a scalar g (NF blocks' skip-init gain, `dpwa.models.nfnet.ScalarGain`):
    example b's gradient is the sum over its views and positions of go * x, a (B,) vector."""

    def __init__(self, rec: Record, go: torch.Tensor, batch: int, mode: str, layer: Layer) -> None:
        self.m = rec.module
        terms = (go * rec.x).reshape(batch, -1)
        self.per_example = {"gain": terms.sum(1)}
        self.terms2 = terms.square().sum(1) if rec.lean else None  # as GroupNormRule's

    def norms2(self) -> torch.Tensor:
        return self.per_example["gain"] ** 2

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"gain": c @ self.per_example["gain"]}


register_rule(nn.Linear, Layer(DenseRule))
register_rule(nn.Conv2d, Layer(DenseRule, pad=pad_module))
register_rule(nn.GroupNorm, Layer(GroupNormRule))

_timm_registered = False


def _register_timm() -> None:
    """timm's layers, registered once timm is imported (a timm layer cannot exist before), so
    that importing the engines does not import timm. Each exact against its timm forward."""
    global _timm_registered
    if _timm_registered or "timm.layers" not in sys.modules:
        return
    _timm_registered = True
    from timm.layers.conv2d_same import Conv2dSame
    from timm.layers.norm import GroupNorm, GroupNorm1
    from timm.layers.norm_act import GroupNorm1Act, GroupNormAct
    from timm.layers.std_conv import ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    register_rule(StdConv2d, Layer(DenseRule, standardise="unit", pad=pad_functional))
    register_rule(StdConv2dSame, Layer(DenseRule, standardise="unit", pad=pad_tf_same))
    register_rule(ScaledStdConv2d, Layer(DenseRule, ("weight", "bias", "gain"), "gain", pad=pad_functional))
    register_rule(ScaledStdConv2dSame, Layer(DenseRule, ("weight", "bias", "gain"), "gain", pad=pad_tf_same))
    register_rule(Conv2dSame, Layer(DenseRule, pad=pad_always_same))
    for cls in (GroupNorm, GroupNorm1):  # F.group_norm (or timm's fast_group_norm: the same function)
        register_rule(cls, Layer(GroupNormRule))
    for cls in (GroupNormAct, GroupNorm1Act):
        register_rule(cls, Layer(GroupNormActRule, check=_check_norm_act))


def _match(module: nn.Module) -> tuple[Optional[type], Optional[Layer]]:
    """(the nearest registered class in the module's MRO, its Layer if the module runs that
    class's forward unchanged, else None)."""
    _register_timm()
    t = type(module)
    for cls in t.__mro__:
        if cls in RULES:
            same = "forward" not in vars(module) and all(getattr(t, f, None) is getattr(cls, f, None) for f in _FORWARD)
            return cls, RULES[cls] if same else None
    return None, None


def layer_of(module: nn.Module) -> Optional[Layer]:
    """The Layer whose rule is exact for `module`, or None."""
    return _match(module)[1]


def is_supported(module: nn.Module) -> bool:
    return layer_of(module) is not None


def problem(module: nn.Module) -> Optional[str]:
    """Why the engine cannot give this layer's own parameters per-example gradients, or None."""
    cls, layer = _match(module)
    name = type(module).__name__
    if cls is None:
        return f"no per-example rule for {name}"
    if layer is None:
        how = "its forward is replaced on the instance" if "forward" in vars(module) else \
            f"it subclasses {cls.__name__} with its own forward"
        return f"no per-example rule for {name}: {how}, which {cls.__name__}'s rule does not describe"
    extra = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad and n not in layer.params]
    if extra:
        return f"no per-example rule for parameter {', '.join(extra)} of {name}"
    return layer.check(module) if layer.check else None


class Chunks:
    """One layer's rule run on consecutive chunks of its examples (`FastEngine` sizes them so
    that a chunk's tensors stay in the CPU's cache, which every pass of a rule reads again):
    the norms side by side, the clipped sums added (a rule's `partial_sum`, then its `finish`
    once, where it has them), exactly the whole batch's."""

    def __init__(self, rules: list, sizes: list[int]) -> None:
        self.rules, self.sizes, self.m = rules, sizes, rules[0].m

    def norms2(self) -> torch.Tensor:
        norms2 = [rule.norms2() for rule in self.rules]
        given = any(getattr(rule, "terms2", None) is not None for rule in self.rules)  # the fast mode: often none
        self.terms2 = torch.cat([terms2_of(rule, n) for rule, n in zip(self.rules, norms2)]) if given else None
        return torch.cat(norms2)

    def clipped_sum(self, c: torch.Tensor) -> dict[str, torch.Tensor]:
        total: dict[str, torch.Tensor] = {}
        for rule, part in zip(self.rules, c.split(self.sizes)):
            for name, value in getattr(rule, "partial_sum", rule.clipped_sum)(part).items():
                total[name] = total[name] + value if name in total else value
        finish = getattr(self.rules[0], "finish", None)
        return finish(total) if finish else total


def terms2_of(rule, norms2: torch.Tensor) -> torch.Tensor:
    """A rule's `terms2` after its `norms2()`: the squared norm its per-example gradients would
    have without cancellation between positions (`DenseRule._terms2`), which
    `dpwa.engines.fast.cancels` compares the norm with; zeros for a rule that gives none (a
    registered rule of one's own: its norms are not checked for rounding)."""
    terms2 = getattr(rule, "terms2", None)
    return torch.zeros_like(norms2) if terms2 is None else terms2


def rule_for(rec: Record, go: torch.Tensor, batch: int, mode: str):
    """The layer's rule. mode: "auto" (choose for per-example norms and a book-kept clipped
    sum: dpwa-fast), "auto-norms" (choose for the norms alone: dpwa-lean, whose second
    backward forms the clipped sum), "ghost" or "instantiate" (forced, for tests and benchmarks)."""
    layer = layer_of(rec.module)
    return layer.rule(rec, go, batch, mode, layer)
