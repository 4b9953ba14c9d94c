"""The probe: before any privacy is charged, check on a few random inputs of the data's shape
that the model and the engine really give what the mechanism's guarantee assumes.

1. Batch independence: example i's output does not depend on example j's input. Each
   example is run alone and inside a batch (and the batch again with one example replaced);
   its output rows must agree. This catches BatchNorm without affine parameters,
   `F.batch_norm` inside `forward`, `x - x.mean(0)`, anything that mixes rows, and names the
   first layer whose output differs.
2. Engine exactness: on a float64 copy of the model (its parameters perturbed, so that
   zero-initialised heads or skip-init gains do not hide the layers behind them), the
   engine's per-example norms, losses and clipped sum (a clip norm that clips some examples
   and not others) equal a loop over single examples with plain autograd, for every trainable
   parameter, to `RTOL` relative to the largest entry. A mismatch, a parameter the engine
   gives no gradient, or a trainable parameter that gets no gradient at all is refused, named,
   with the engine that can handle it.
3. Anything the engine raises on the model (in-place changes after a hooked layer, a layer
   called twice, an unsupported padding, Opacus's missing grad samplers) surfaces here,
   before the reservation, as a `ProbeError` (exit 2).

Cost: a forward of the batch, one forward per example, one backward per example and one
engine call, on `examples` examples in float64: about 2-4 training steps of that size
(measured in the README).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .errors import UsageError
from .rows import Rows, RowsError, example_losses, tiling_of

__all__ = ["probe", "ProbeError", "ProbeReport", "RTOL"]

RTOL = 1e-6  # float64: rules and loop agree to ~1e-12; 1e-6 leaves room for ill-conditioned layers


class ProbeError(UsageError, ValueError):
    """The model or the engine fails the probe: the message names the layer or parameter."""


@dataclasses.dataclass(frozen=True)
class ProbeReport:
    engine: str
    examples: int
    views: int
    parameters: int
    max_norm_error: float
    max_sum_error: float
    seconds: float


def _fallback(engine: str) -> str:
    return ("privacy.engine=torch-func handles any layer without cross-example interaction"
            if engine != "torch-func" else "no engine can clip this model correctly; change the layer")


def _outputs_by_module(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """The model's output and every submodule's tensor output, in execution order."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and module is not model:
            seen.append((names.get(module, type(module).__name__), output.detach()))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def _check_independence(model: nn.Module, views: torch.Tensor, rows: Rows) -> None:
    out, by_module = _outputs_by_module(model, views.flatten(0, 1))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ProbeError(f"the model must return a (rows, classes) tensor of logits; got "
                         f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
    try:
        rows.check(out.shape[0], "the model's output")
        folded = rows.fold(out)
    except RowsError as e:
        raise ProbeError(str(e)) from None
    again = model(views.flatten(0, 1)).detach()
    if not torch.equal(again, out.detach()):
        raise ProbeError("the model's forward pass is random (dropout?) in training mode: the probe cannot tell "
                         "its examples apart. Make it deterministic in training mode (e.g. drop dropout)")
    one = Rows(examples=1, views=rows.views, tiling=rows.tiling)
    for i in range(rows.examples):
        alone, alone_modules = _outputs_by_module(model, views[i])
        if not torch.allclose(one.fold(alone)[0], folded[i], rtol=1e-9, atol=1e-9):
            culprit = _first_mixing(by_module, alone_modules, i, rows)
            raise ProbeError(
                f"the model mixes examples: example {i}'s output changes with the other examples of its batch"
                f"{culprit}. BatchNorm (also without affine parameters, or F.batch_norm in forward) and batch "
                "statistics (x - x.mean(0)) make one example's gradient depend on the others, so per-example "
                "clipping no longer bounds its influence; use GroupNorm or per-example operations")


def _first_mixing(batch: list, alone: list, i: int, rows: Rows) -> str:
    for (name, a), (_, b) in zip(batch, alone):
        if a.shape[0] not in (rows.inputs, rows.outputs) or b.shape[0] * rows.examples != a.shape[0]:
            return f" (first seen at the output of {name!r}, whose rows do not follow the examples)"
        try:
            mine = rows.fold(a)[i]
            solo = Rows(1, rows.views, rows.tiling).fold(b)[0]
        except RowsError:
            return f" (first seen at the output of {name!r})"
        if mine.shape != solo.shape or not torch.allclose(mine, solo, rtol=1e-9, atol=1e-9):
            return f" (first seen at the output of layer {name!r})"
    return " (in the model's own forward, outside any submodule)"


def _loop(model: nn.Module, views: torch.Tensor, labels: torch.Tensor, rows: Rows
          ) -> tuple[dict[str, Optional[torch.Tensor]], torch.Tensor]:
    """The obviously correct reference: each example alone, plain autograd, float64."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    grads: dict[str, list] = {n: [] for n in params}
    losses = []
    one = Rows(examples=1, views=rows.views, tiling=rows.tiling)
    for i in range(rows.examples):
        loss = example_losses(model(views[i]), labels[i:i + 1], one)[0]
        got = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for n, g in zip(params, got):
            grads[n].append(g)
        losses.append(loss.detach())
    out = {n: None if all(g is None for g in gs) else
           torch.stack([g if g is not None else torch.zeros_like(params[n]) for g in gs]) for n, gs in grads.items()}
    return out, torch.stack(losses)


def probe(model: nn.Module, engine: str, *, example_shape: Sequence[int], views: int, num_classes: int,
          examples: int = 4, seed: int = 0) -> ProbeReport:
    """Check `model` and `engine` (a name in `dpwa.engines.ENGINES`) as described above, on a
    copy of the model (the model itself is not changed).

    Raises:
        ProbeError: the model mixes examples, or the engine is not exact on it (named).
    """
    from .engines import make_engine
    from .engines.reference import clip_factors

    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    work = copy.deepcopy(model).double().train()
    for m in work.modules():  # hooks of engines built on the original do not belong to the copy
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        m._backward_hooks.clear()
    with torch.no_grad():  # perturbed, so that zero-initialised layers do not hide the ones behind them
        for p in work.parameters():
            if p.is_floating_point():
                p.add_(0.1 * (p.abs().mean() + 0.1) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(examples, views, *example_shape, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (examples,), generator=gen)
    rows = Rows(examples=examples, views=views, tiling=tiling_of(model))
    try:
        _check_independence(work, x, rows)
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - the model fails on inputs of the data's shape
        raise ProbeError(f"the model fails on {examples} x {views} inputs of shape {tuple(example_shape)}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None

    names = {p: n for n, p in work.named_parameters() if p.requires_grad}
    want, want_losses = _loop(work, x, labels, rows)
    dead = [n for n, g in want.items() if g is None]
    if dead:
        raise ProbeError(f"trainable parameter(s) {', '.join(dead)} get no gradient from the loss: freeze them "
                         "(requires_grad=False) or remove them")
    norms_ref = torch.sqrt(sum(g.reshape(examples, -1).square().sum(1) for g in want.values()))
    clip = float(norms_ref.median())  # some examples clipped, some not
    factors = clip_factors(norms_ref, clip)
    sums_ref = {n: torch.einsum("b,b...->...", factors, g) for n, g in want.items()}
    try:
        eng = make_engine(engine, work)
        try:
            sums, losses, norms = eng.clipped_sum(x, labels, clip, rows)
        finally:
            eng.remove()
    except UsageError as e:
        raise ProbeError(f"privacy.engine={engine}: {e}") from None
    except Exception as e:  # noqa: BLE001 - Opacus and autograd errors on the model, named
        raise ProbeError(f"privacy.engine={engine} fails on this model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); {_fallback(engine)}") from None
    norm_err = float(((norms - norms_ref).abs() / norms_ref.max().clamp_min(1e-300)).max())
    loss_err = float((losses - want_losses).abs().max())
    got = {names[p]: v for p, v in sums.items() if p in names}
    missing = [n for n in want if n not in got]
    wrong = []
    worst = 0.0
    for n, ref in sums_ref.items():
        if n in got:
            err = float((got[n].reshape(ref.shape) - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
            worst = max(worst, err)
            if err > RTOL:
                wrong.append(f"{n} (relative error {err:.2g})")
    if missing or wrong or norm_err > RTOL or loss_err > 1e-8:
        parts = []
        if missing:
            parts.append(f"gives no gradient for {', '.join(missing)}")
        if wrong:
            parts.append(f"gives wrong clipped gradients for {', '.join(wrong)}")
        if norm_err > RTOL:
            parts.append(f"gets per-example norms wrong by up to {norm_err:.2g} of the largest (so its clipping "
                         "does not bound an example's influence by C)")
        if loss_err > 1e-8:
            parts.append(f"gets per-example losses wrong by {loss_err:.2g}")
        raise ProbeError(f"privacy.engine={engine} is not exact on this model against a loop over single examples: "
                         f"it {'; '.join(parts)}. {_fallback(engine).capitalize()}")
    return ProbeReport(engine=engine, examples=examples, views=views, parameters=len(want),
                       max_norm_error=norm_err, max_sum_error=worst, seconds=time.time() - t0)
