"""The probe: before any privacy is charged, check on a few random inputs of the data's shape
that the model and the engine really give what the mechanism's guarantee assumes.

1. Batch independence: example i's output does not depend on example j's input. Each
   example is run alone and inside the batch; its output rows must agree. This catches
   BatchNorm without affine parameters, `F.batch_norm` inside `forward`, `x - x.mean(0)`,
   anything that mixes rows, and says where the mixing first happens: in a layer (its input
   agrees, its output does not), or in forward code outside any layer (a layer's input
   already differs). In training mode (the steps) and in evaluation mode (a charged
   validation accuracy or loss query runs `model.eval()` on private examples). Nothing the
   passes write may stay in the model: every buffer, parameter and `state_dict()` entry
   (extra state, a buffer registered in a forward) is compared before and after.
2. Engine exactness: on a float64 copy of the model (its parameters perturbed, so that
   zero-initialised heads or skip-init gains do not hide the layers behind them), the
   engine's per-example norms, losses and clipped sum (a clip norm that clips some examples
   and not others), on every path it may take at run time (`dpwa.engines.PATHS`: dpwa-fast's
   fast and lean modes, each on one chunk and in chunks of 2 examples), equal a loop over
   single examples with plain autograd, for every trainable parameter, to `RTOL` relative
   to the largest entry. A mismatch, a parameter the engine
   gives no gradient, or a trainable parameter that gets no gradient at all is refused, named,
   with the engine that can handle it.
3. Anything the engine raises on the model (in-place changes after a hooked layer, a layer
   called twice, a parameter used outside its layer, Opacus's own errors) surfaces here,
   before the reservation, as a `ProbeError` (exit 2).

Cost: a forward of the batch, one forward per example, one backward per example and one
engine call per path of the engine (four for dpwa-fast), on `examples` examples in float64,
once per run: 0.5-1.5 training steps of 256 examples (measured in the README).
"""

from __future__ import annotations

import copy
import dataclasses
import re
import time
from typing import Any, Callable, Optional, Sequence

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


def _first_sentence(e: BaseException) -> str:
    """The gist of a library's error (Opacus and autograd write paragraphs)."""
    text = (str(e).splitlines() or [""])[0]
    return text.split(". ")[0]


def _fallback(engine: str) -> str:
    return ("privacy.engine=torch-func handles any layer without cross-example interaction"
            if engine != "torch-func" else "no engine can clip this model correctly; change the layer")


@dataclasses.dataclass
class _Call:
    """One submodule call seen by the independence check (in the order calls finish)."""

    name: str
    kind: str
    input: Optional[torch.Tensor]
    output: torch.Tensor
    changed_in_place: bool = False  # the layer's output was modified after the layer returned it


def _calls(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[_Call]]:
    """The model's output and every submodule call with a tensor output, in the order they finish
    (a layer's submodules finish before it)."""
    names = {m: n for n, m in model.named_modules()}
    seen: list[_Call] = []
    versions: list[tuple[torch.Tensor, int]] = []

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and module is not model:
            first = inputs[0].detach().clone() if inputs and isinstance(inputs[0], torch.Tensor) else None
            seen.append(_Call(names.get(module, "?"), type(module).__name__, first, output.detach().clone()))
            versions.append((output, output._version))

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    for call, (t, v) in zip(seen, versions):
        call.changed_in_place = t._version != v
    return out, seen


#: the modes the model runs on private data in: training (the steps), evaluation (a charged
#: validation accuracy or loss query, `model.eval()`); a model may mix examples in either alone
_MODES = (("training", True), ("evaluation", False))


def _check_independence(model: nn.Module, views: torch.Tensor, rows: Rows, mode: str = "training") -> list[str]:
    """Raise ProbeError if the model mixes examples (run in `mode`, as the caller set it); else
    return the layers whose output is modified in place after they return it (what hook-based
    engines fail on)."""
    out, batch_calls = _calls(model, views.flatten(0, 1))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ProbeError(f"the model must return a (rows, classes) tensor of logits; got "
                         f"{type(out).__name__}{'' if not isinstance(out, torch.Tensor) else tuple(out.shape)}")
    try:
        rows.check(out.shape[0], "the model's output")
        folded = rows.fold(out)
    except RowsError as e:
        raise ProbeError(str(e)) from None
    with torch.no_grad():
        again = model(views.flatten(0, 1))
    if not torch.equal(again, out):
        raise ProbeError(f"the model's forward pass is random (dropout?) in {mode} mode: the probe cannot tell "
                         f"its examples apart. Make it deterministic in {mode} mode (e.g. drop dropout)")
    one = Rows(examples=1, views=rows.views, tiling=rows.tiling)
    for i in range(rows.examples):
        try:
            alone, alone_calls = _calls(model, views[i])
        except Exception as e:  # noqa: BLE001 - e.g. batch statistics of a single example
            raise ProbeError(f"the model mixes examples in {mode} mode: it runs on a batch but fails on example {i} alone "
                             f"({type(e).__name__}: {_first_sentence(e)}), so its output depends on the batch. "
                             "BatchNorm (also without affine parameters, or F.batch_norm in forward) and batch "
                             "statistics make one example's gradient depend on the others; use GroupNorm or "
                             "per-example operations") from None
        if not torch.allclose(one.fold(alone)[0], folded[i], rtol=1e-9, atol=1e-9):
            raise ProbeError(
                f"the model mixes examples in {mode} mode: example {i}'s output changes with the other examples of "
                f"its batch; "
                f"{_culprit(batch_calls, alone_calls, i, rows)}. BatchNorm (also without affine parameters, or "
                "F.batch_norm in forward) and batch statistics (x - x.mean(0)) make one example's gradient depend "
                "on the others, so per-example clipping no longer bounds its influence; use GroupNorm or "
                "per-example operations" + (
                    f". A model that tiles its batch must also declare its order truly (model.dpwa_tiling "
                    f"says {rows.tiling.order})" if rows.tiling.members > 1 else ""))
    return [f"{c.name!r} ({c.kind})" for c in batch_calls if c.changed_in_place]


def _same_rows(a: Optional[torch.Tensor], b: Optional[torch.Tensor], i: int, rows: Rows) -> bool:
    """Whether example i's rows of `a` (a batch tensor) equal `b` (the example run alone)."""
    if a is None or b is None:
        return True
    try:
        mine, solo = rows.fold(a)[i], Rows(1, rows.views, rows.tiling).fold(b)[0]
    except RowsError:  # rows that do not follow the examples (a batch-wide reduction)
        return False
    return mine.shape == solo.shape and torch.allclose(mine, solo, rtol=1e-9, atol=1e-9)


def _culprit(batch: list[_Call], alone: list[_Call], i: int, rows: Rows) -> str:
    """Where the mixing happens: the first call (in the order calls finish) whose output differs.
    If its input agrees, that layer mixes (a leaf, or its own forward code: its submodules all
    finished earlier and agreed). If its input already differs, the mixing is in forward code
    outside any layer: in the nearest enclosing module whose own input still agrees."""
    inputs: dict[str, bool] = {}
    for b, a in zip(batch, alone):  # a layer called twice: its first call
        inputs.setdefault(b.name, _same_rows(b.input, a.input, i, rows))
    for b, a in zip(batch, alone):
        if _same_rows(b.output, a.output, i, rows):
            continue
        if inputs[b.name]:
            return f"it first happens in layer {b.name!r} ({b.kind})"
        called, owner = b.name, "the model"
        parts = b.name.split(".")
        for k in range(len(parts) - 1, 0, -1):  # enclosing modules, nearest first
            parent = ".".join(parts[:k])
            if inputs.get(parent, True):
                owner = repr(parent)
                break
            called = parent
        return (f"the input of {called!r} already mixes them: the mixing is in the forward code of {owner}, "
                f"outside any layer, before it calls {called!r} (e.g. x - x.mean(0), or F.batch_norm)")
    return "it happens in the model's own forward code, outside any layer (e.g. x - x.mean(0), or F.batch_norm)"


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


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything a forward could leave in the model: every buffer and parameter (frozen ones
    too: `nn.Parameter(requires_grad=False)` is a common home for a running statistic), and all
    the weights file and checkpoint save, `state_dict()`: a buffer registered during a forward,
    a module's `get_extra_state()`."""
    out: dict[str, Any] = {n: t.detach().clone() for n, t in [*model.named_buffers(), *model.named_parameters()]}
    for n, v in model.state_dict(keep_vars=True).items():
        if n not in out:
            out[n] = v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)
    return out


def _same(a: Any, b: Any) -> bool:
    """Whether two saved values are equal: tensors exactly, containers entry by entry."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a.detach().cpu(), b.detach().cpu()))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - a value without a truthful ==: assume it changed
        return False


def _check_state(before: dict[str, Any], model: nn.Module, when: str) -> None:
    """Nothing a forward or a backward writes may stay in the model: it is saved with the
    weights, unnoised. Checked after the passes without gradients and after those with them (a
    statistic may be written only while gradients are on), in both modes."""
    now = _state(model)
    changed = [n for n, t in before.items() if n in now and not _same(t, now[n])]
    new = [n for n in now if n not in before]
    if changed or new:
        what = (f"buffer(s) or parameter(s) {', '.join(changed)} change" if changed else "") + (
            " and " if changed and new else "") + (f"new state {', '.join(new)} appears" if new else "")
        raise ProbeError(f"{what} when the model runs on a batch ({when}): a statistic of the private data (a "
                         "running mean? a copy of an input?) would be released unnoised with the weights. Compute "
                         "it from public data, or make it a trained parameter")


def _check_at_scale(model: nn.Module, batch: int, views: int, example_shape: Sequence[int], rows_tiling: Any,
                    gen: torch.Generator, device: torch.device) -> None:
    """Batch independence once more at the training's physical batch size and dtype: mixing
    that only happens in large batches or in float32 is caught too (within float32 rounding), in
    training mode (the steps) and in evaluation mode (a charged validation or loss query)."""
    work = _clean_copy(model)
    dtype = next((p.dtype for p in work.parameters() if p.is_floating_point()), torch.float32)
    x = torch.randn(batch, views, *example_shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    rows = Rows(examples=batch, views=views, tiling=rows_tiling)
    one = Rows(examples=1, views=views, tiling=rows_tiling)
    before = _state(work)
    for mode, training in _MODES:
        work.train(training)
        with torch.no_grad():
            out = rows.fold(work(x.flatten(0, 1)))
            scale = out.abs().max().clamp_min(1e-6)
            for i in sorted({0, batch // 2, batch - 1}):
                alone = one.fold(work(x[i:i + 1].flatten(0, 1)))[0]
                err = float((alone - out[i]).abs().max() / scale)
                if err > 1e-3:
                    raise ProbeError(f"the model mixes examples in a batch of {batch} (the training's physical "
                                     f"batch) in {mode} mode: example {i}'s output changes by {err:.2g} of the output "
                                     "scale with the other examples of its batch. Batch statistics (BatchNorm, "
                                     "x - x.mean(0)) make one example's gradient depend on the others; use GroupNorm "
                                     "or per-example operations")
        _check_state(before, work, f"a forward of {batch} examples in {mode} mode")


def _clean_copy(model: nn.Module) -> nn.Module:
    """A copy of the model as it trains: with its own hooks (a user's forward hook that scales
    or mixes a layer's output is part of the function the engine must clip), without the
    recording hooks of dpwa-fast engines built on the original (the only engine whose hooks
    outlive a call; they belong to the original's engine)."""
    from .engines import FastEngine

    work = copy.deepcopy(model)
    for m in work.modules():
        for key in [k for k, hook in m._forward_hooks.items() if isinstance(getattr(hook, "__self__", None), FastEngine)]:
            del m._forward_hooks[key]
    return work


def probe(model: nn.Module, engine: str, *, example_shape: Sequence[int], views: int, num_classes: int,
          examples: int = 4, seed: int = 0, batch: int = 0) -> ProbeReport:
    """Check `model` and `engine` (a name in `dpwa.engines.ENGINES`) as described above, on a
    copy of the model (the model itself is not changed): batch independence and unchanged state
    in training and in evaluation mode, the engine in training mode. `batch` > 0 also
    checks batch independence at that batch size in the model's own dtype (the trainer
    passes its physical batch size). Inputs are random: mixing that depends on the data's
    values (data-dependent control flow) is outside what a probe can see; `torch-func`
    computes each example's gradient alone by construction.

    Raises:
        ProbeError: the model mixes examples, or the engine is not exact on it (named).
    """
    from .engines import engine_paths
    from .engines.reference import clip_factors

    from .models import ModelError, check_dp_compatible

    t0 = time.time()
    gen = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    lazy = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if nn.parameter.is_lazy(t)]
    if lazy:  # a lazy module's shapes are unknown until a forward (a lazy BatchNorm: say that first)
        try:
            check_dp_compatible(model)
        except ModelError as refused:
            raise ProbeError(str(refused)) from None
        raise ProbeError(f"the model has uninitialised lazy parameters or buffers ({', '.join(lazy[:3])}): a lazy "
                         "module (nn.Lazy*) must be initialised, by a forward on public inputs, before training")
    work = _clean_copy(model).double().train()
    with torch.no_grad():  # perturbed, so that zero-initialised layers do not hide the ones behind them
        for p in work.parameters():
            if p.is_floating_point():
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                p.add_(0.1 * (p.abs().mean() + 0.1) * noise)
    x = torch.randn(examples, views, *example_shape, generator=gen, dtype=torch.float64).to(device)
    labels = torch.randint(0, num_classes, (examples,), generator=gen).to(device)
    rows = Rows(examples=examples, views=views, tiling=tiling_of(model))
    before = _state(work)
    try:
        for mode, training in reversed(_MODES):  # training mode last: the rest of the probe runs in it
            in_place = _check_independence(work.train(training), x, rows, mode)
            _check_state(before, work, f"forwards without gradients in {mode} mode")
        if batch > 1:
            _check_at_scale(model, batch, views, example_shape, tiling_of(model), gen, device)
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - the model fails on inputs of the data's shape
        raise ProbeError(f"the model fails on {examples} x {views} inputs of shape {tuple(example_shape)}: "
                         f"{type(e).__name__}: {_first_sentence(e)}") from None

    names = {p: n for n, p in work.named_parameters() if p.requires_grad}
    want, want_losses = _loop(work, x, labels, rows)
    _check_state(before, work, "a forward and backward per example")
    dead = [n for n, g in want.items() if g is None]
    if dead:
        raise ProbeError(f"trainable parameter(s) {', '.join(dead)} get no gradient from the loss: freeze them "
                         "(requires_grad=False) or remove them")
    norms_ref = torch.sqrt(sum(g.reshape(examples, -1).square().sum(1) for g in want.values()))
    clip = float(norms_ref.median())  # some examples clipped, some not
    factors = clip_factors(norms_ref, clip)
    sums_ref = {n: torch.einsum("b,b...->...", factors, g) for n, g in want.items()}
    ref = _Reference(x, labels, rows, clip, names, want, want_losses, norms_ref, sums_ref)
    errors = []
    for label, build in engine_paths(engine).items():
        errors.append(_check_path(label, build, work, ref, in_place, engine))
        _check_state(before, work, label)
    norm_err, worst = (max(e) for e in zip(*errors))
    return ProbeReport(engine=engine, examples=examples, views=views, parameters=len(want),
                       max_norm_error=norm_err, max_sum_error=worst, seconds=time.time() - t0)


@dataclasses.dataclass(frozen=True)
class _Reference:
    """The loop over single examples that every path of the engine is checked against."""

    x: torch.Tensor
    labels: torch.Tensor
    rows: Rows
    clip: float
    names: dict[nn.Parameter, str]
    grads: dict[str, torch.Tensor]  # per-example gradients by parameter name
    losses: torch.Tensor
    norms: torch.Tensor
    sums: dict[str, torch.Tensor]  # clipped sums by parameter name


def _check_path(label: str, build: Callable[[nn.Module], Any], work: nn.Module, ref: _Reference,
                in_place: list[str], engine: str) -> tuple[float, float]:
    """Engine exactness (step 2) on one run-time path of the engine (`dpwa.engines.PATHS`),
    named `label` in a refusal; returns its largest norm and clipped-sum errors."""
    try:
        eng = build(work)
        try:
            sums, losses, norms = eng.clipped_sum(ref.x, ref.labels, ref.clip, ref.rows)
        finally:
            eng.remove()
    except UsageError as e:  # the engine's own refusal, which names the layer and the engine
        said = re.match(r"privacy\.engine=[\w-]+(:?) ", str(e))  # the engine's own name for itself, replaced by the path's
        raise ProbeError(f"{label}{said.group(1)} {str(e)[said.end():]}" if said else f"{label}: {e}") from None
    except Exception as e:  # noqa: BLE001 - Opacus and autograd errors on the model, named
        hint = (f"; the output of {', '.join(in_place)} is modified in place after the layer (e.g. "
                "ReLU(inplace=True)), which hook-based engines cannot follow: make it out of place") if in_place else ""
        raise ProbeError(f"{label} fails on this model ({type(e).__name__}: {_first_sentence(e)})"
                         f"{hint}; {_fallback(engine)}") from None
    norm_err = float(((norms - ref.norms).abs() / ref.norms.max().clamp_min(1e-300)).max())
    loss_err = float((losses - ref.losses).abs().max())
    got = {ref.names[p]: v for p, v in sums.items() if p in ref.names}
    missing = [n for n in ref.grads if n not in got]
    wrong = []
    worst = 0.0
    for n, want in ref.sums.items():
        if n in got:
            # relative to the parameter's own gradient, or to 1e-3 C where that is ~0 (a conv bias
            # before a GroupNorm of one channel per group has a zero gradient up to rounding)
            err = float((got[n].reshape(want.shape) - want).abs().max() / want.abs().max().clamp_min(1e-3 * ref.clip))
            worst = max(worst, err)
            if err > RTOL:
                wrong.append(f"{n} (relative error {err:.2g})")
    if missing or wrong or norm_err > RTOL or loss_err > 1e-8:
        parts = []
        if missing:
            parts.append(f"gives no gradient for {', '.join(missing)} (a parameter used outside its layer's forward, "
                         "e.g. F.linear(x, self.fc.weight), is invisible to per-layer hooks)")
        if wrong:
            parts.append(f"gives wrong clipped gradients for {', '.join(wrong)}")
        if norm_err > RTOL:
            parts.append(f"gets per-example norms wrong by up to {norm_err:.2g} of the largest (so its clipping "
                         "does not bound an example's influence by C)")
        if loss_err > 1e-8:
            parts.append(f"gets per-example losses wrong by {loss_err:.2g}")
        raise ProbeError(f"{label} is not exact on this model against a loop over single examples: "
                         f"it {'; '.join(parts)}. {_fallback(engine).capitalize()}")
    return norm_err, worst
