"""The dpwa-fast engine: per-example clipping from one forward and one backward pass.

Forward hooks record each trainable layer's input and put a hook on its output. One
`autograd.grad` call asks only for the outputs of the layers that read the data (every other
layer's output gradient lies on the way to them), so autograd skips the weight-gradient work
of backprop altogether. As each layer's output gradient arrives, its hook builds the layer's
rule (`rules.py`): per-example squared norms by instantiating per-example gradients or by
ghost norm, whichever is cheaper for its shape, keeping only what the clipped sum will need,
and the layer's record lets go of its tensors. With the clip factors known, each layer's
clipped sum is one weight-gradient contraction (book-keeping, Bu et al. 2023) or a pass over
its per-example gradients. Output gradients are thus released layer by layer, as in a
non-private backward, except those that book-keeping needs. Augmentation multiplicity costs
nothing extra: an example's K views are more positions of the same example in every
contraction, so memory is per example, never per view. On a CPU each layer's instantiated
per-example gradients are formed on chunks of examples whose tensors fit the cache
(`_CACHE_BYTES`, `_INSTANTIATE_BYTES`, `rules.Chunks`, `cache_chunk`): the rule reads them several times over, and
the batch's whole tensors would be read from memory each time.

`memory="lean"` (registered as `dpwa-lean`) trades time for memory (ghost clipping's two
backward passes, Li et al. 2021; Bu et al. 2022): the same first backward, whose hooks keep
only each layer's per-example squared norms (computed in chunks of examples) and which does
not keep its graph, then a second, ordinary forward and backward of sum_b c_b loss_b whose
parameter gradients are the clipped sum; the forward is repeated with the random state of
the first (dropout draws the same masks). Both passes free each layer's saved tensors as they
go, so peak memory is a non-private step's plus one layer's rule, at the cost of one more forward.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..rows import Rows, example_losses, rows_of
from .errors import EngineError
from .reference import clip_and_sum, clip_factors, per_example_grads
from .rules import Chunks, Record, layer_of, problem, rule_for, terms2_of

__all__ = ["FastEngine", "EngineError", "unsupported_parameters", "cache_chunk", "even_chunks", "transient", "cancels"]


def unsupported_parameters(model: nn.Module) -> list[str]:
    """Every trainable parameter the engine cannot give a per-example gradient, with the reason.

    A layer without a rule for its exact forward (`rules.problem`) is refused, and so is a
    parameter held by two layers (tied weights): its per-example gradient is the sum of both
    layers' parts, whose norm the per-layer rules cannot give. A parameter of a supported layer
    used outside it (`F.linear(x, self.fc.weight)`) shows only at run time: `clipped_sum`
    refuses it when the layer is never called, the probe (`dpwa.probe`) when it is."""
    out, owner = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        why = problem(module) if own else None
        full = [f"{name}.{n}" if name else n for n, _ in own]
        if why:
            out += [f"{f} ({why})" for f in full]
        for f, (_, p) in zip(full, own):
            if id(p) in owner and owner[id(p)] != f:
                out.append(f"{f} (the same Parameter as {owner[id(p)]}: tied weights)")
            owner.setdefault(id(p), f)
    return sorted(set(out), key=out.index)


#: On a CPU, a layer's rule runs on chunks of examples whose tensors take about this many bytes
#: (`FastEngine._chunks`): within the cache (2 MB of L2 per core, 32 MB of shared L3 here), fitted to
#: per-layer times at 2-256 examples per chunk (experiments/bench_layer_rules.py). That is for
#: elementwise rules (GroupNorm's); a conv's or linear layer's instantiated per-example gradients
#: take _INSTANTIATE_BYTES: fewer, larger calls of their kernels. Timed per layer inside whole
#: steps with freed memory kept for reuse (`dpwa.alloc`), their rules took 1.5-7% less time at 48 MB
#: than at 12 MB on WRN-16-4 (64 and 256 images, K = 1 and 4), the same within noise on the tanh CNN.
_CACHE_BYTES = 12 << 20
_INSTANTIATE_BYTES = 48 << 20


def transient(rule, x1: torch.Tensor) -> int:
    """Elements a rule allocates per example besides its input and output gradient (x1: one
    example's rows of the input). A rule without its own estimate (GroupNorm's, FiLM's:
    elementwise) makes a few temporaries the size of its input."""
    return getattr(rule, "transient", lambda: 2 * x1.numel())()


def cache_chunk(rule, x1: torch.Tensor, go1: torch.Tensor) -> int:
    """Examples per chunk on a CPU for a layer whose rule on one example (rows x1, go1) is
    `rule`: as many as keep the input, output gradient and temporaries within _CACHE_BYTES
    (_INSTANTIATE_BYTES for a dense layer's instantiated per-example gradients).

    Ghost norm runs on the whole batch: its work is per example already (each example's Gram
    matrices fit the cache) and its book-kept clipped sum is one dense weight-gradient GEMM,
    fastest on all examples at once, where instantiating rules gain from cache-sized chunks
    (the *chunk* column of experiments/results/bench_layer_rules.md)."""
    ghost = getattr(rule, "ghost", None)  # None: not a dense layer's rule (elementwise)
    if ghost:
        return sys.maxsize
    budget = _CACHE_BYTES if ghost is None else _INSTANTIATE_BYTES
    return max(1, budget // max(1, (x1.numel() + go1.numel() + transient(rule, x1)) * x1.element_size()))


#: `cancels`: a per-example squared norm below this many units of rounding of its dtype times
#: its rules' `terms2` (the squared norm its positions' terms would give if none cancelled) is
#: redone alone. float32: 1.2e-2, so a norm the rules keep has lost at most ~1e-4 of itself to
#: rounding (`experiments/results/ghost_cancellation.md`); float64: 2e-11.
_CANCEL_ULPS = 1e5


def cancels(norms2: torch.Tensor, terms2: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the examples whose squared norm is a difference of terms so much larger than
    itself that rounding decides it. Ghost norm sums (a_p . a_q)(go_p . go_q) over pairs of
    positions; an input nearly the same at every position with an output gradient that sums to
    ~0 over them (a conv before GroupNorm) cancels almost all of it, and float32 rounded such a
    norm to 0 while the book-kept clipped sum kept the example's whole gradient (helper review:
    contribution 6.7 C). A negative norm is one too, and a finite norm of terms that overflow;
    a non-finite norm is not (the mechanism drops such examples)."""
    limit = _CANCEL_ULPS * torch.finfo(norms2.dtype).eps * terms2
    return torch.isfinite(norms2) & ((terms2 > 0) & (norms2 < limit) | ~torch.isfinite(terms2))


def even_chunks(n: int, most: int) -> list[tuple[int, int]]:
    """[first, end) of the fewest chunks of at most `most` (>= 1) of n items, of sizes within one."""
    parts = -(-n // max(1, min(n, most)))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


class FastEngine:
    """Args:
        model: a model whose trainable parameters all sit directly in layers with a rule for
            their exact forward (`rules.RULES`).
        mode: "auto" (cheaper of ghost norm and instantiation per layer), "ghost" or
            "instantiate" (all layers; for tests and benchmarks).
        memory: "fast" (one backward; each layer's rule, formed in its output's gradient
            hook, keeps until the clip factors are known what the clipped sum needs: its input
            and output gradient, or its per-example gradients), "lean" (only norms in the
            hooks, then a second backward for the clipped sum; see the module), or
            "auto": fast, unless what fast holds for the first chunk (its layers' inputs, outputs
            and output gradients; shapes only, from a forward without autograd before it) would
            exceed half the memory then free on the device (`_free_bytes`), then lean for the
            whole run. `memory` holds the choice from the first chunk on; the trainer makes
            it before any chunk (`plan_memory`).
        max_chunk: at most this many examples per chunk wherever a layer's rule runs in chunks
            at large batches (a CPU's instantiating and elementwise rules, dpwa-lean's norms):
            the probe sets 2, so that its 4 examples take the chunked code large batches take.
        redo: which examples are redone alone (`_alone`), from the batch's squared norms and
            terms2 (default `cancels`: those whose norm is rounding noise). The probe passes
            every other one, so that the path a cancelling example takes mid-run, and its sum
            with the others, is checked on the model before any privacy is spent.
    """

    def __init__(self, model: nn.Module, *, mode: str = "auto", memory: str = "fast",
                 max_chunk: Optional[int] = None,
                 redo: Callable[[torch.Tensor, Any], torch.Tensor] = cancels) -> None:
        if mode not in ("auto", "ghost", "instantiate"):
            raise ValueError(f"mode must be auto, ghost or instantiate, got {mode!r}")
        if memory not in ("fast", "lean", "auto"):
            raise ValueError(f"memory must be fast, lean or auto, got {memory!r}")
        if max_chunk is not None and max_chunk < 1:
            raise ValueError(f"max_chunk must be >= 1, got {max_chunk}")
        self.model, self.mode, self.memory, self.max_chunk, self.redo = model, mode, memory, max_chunk, redo
        self.name = "dpwa-lean" if memory == "lean" else "dpwa-fast"
        self.names = {m: n for n, m in model.named_modules()}
        self.layers: dict[nn.Module, dict[str, nn.Parameter]] = {}
        for module in self.names:
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            if not own:
                continue
            self.layers[module] = own
        bad = unsupported_parameters(model)
        if bad:
            raise EngineError(f"privacy.engine={self.name} cannot give per-example gradients for {len(bad)} trainable "
                              f"parameter(s): {', '.join(bad)}; use privacy.engine=torch-func, which handles any "
                              "layer, or freeze them")
        self._records: Optional[list[Record]] = None
        self._pass: Optional[_HookPass] = None
        #: How each layer's norms are computed, from shapes only (public): {layer: "ghost norm" |
        #: "instantiated" | its rule's name}, filled by the first chunk; runs report it once.
        self.plan: dict[str, str] = {}
        self._sizes: dict[tuple, tuple[int, int]] = {}  # (temporaries per example, CPU chunk) by layer, rows per example, shape, mode
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if self._records is None or not torch.is_grad_enabled():
            return  # evaluation, EMA copies, non-private forward passes
        if any(r.module is module for r in self._records):
            raise EngineError(f"privacy.engine={self.name}: layer {self._name(module)} is called twice in one forward "
                              "pass (shared weights), and its rule sees one call; use privacy.engine=torch-func")
        x = inputs[0].detach()
        rec = Record(module, x, output, output._version, x._version, reads_data=not inputs[0].requires_grad)
        # The norms hook goes on the output now, so that the record need not hold the output
        # (autograd often does not: a conv before tanh); only the backward's targets and, in
        # the fast mode, a rule that reads it (a standardised conv's; the lean one recomputes
        # what it needs) keep it. A hook put on a tensor before an in-place change gets the
        # gradient of its value before it.
        self._pass.handles.append(output.register_hook(self._pass.hook(rec)))
        if not rec.reads_data and (self._pass.lean or layer_of(module).standardise is None):
            rec.out = None
        self._records.append(rec)

    def _name(self, module: nn.Module) -> str:
        return f"{self.names.get(module, '?')!r} ({type(module).__name__})"

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def clipped_sum(self, views: torch.Tensor, labels: torch.Tensor, clip_norm: float, rows: Optional[Rows] = None
                    ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Sum over examples of their clipped gradients (the gradient of the mean loss over all
        their rows, clipped to `clip_norm`), for views (B, K, ...) and labels (B,).

        Every layer's rows are put example-major with the chunk's `rows` (a model that tiles its
        batch member-major has its rows regrouped by example) before its rule sees them.

        Returns ({param: clipped sum}, per-example losses (B,), per-example norms (B,)).
        """
        if len(views) == 0:  # nothing to clip (the mechanism skips empty chunks; a direct caller may not)
            empty = views.new_zeros(0)
            return {p: torch.zeros_like(p) for own in self.layers.values() for p in own.values()}, empty, empty
        rows = rows or rows_of(self.model, views)
        self.plan_memory(views, len(views))  # memory="auto": chosen before the first chunk's forward, once
        # dpwa-lean repeats this forward with the same randomness; the fast mode never needs it
        rng = None if self.memory == "fast" else _rng_state(views.device)
        self._records = []
        self._pass = _HookPass(self, rows, lean=self.memory == "lean")
        try:
            out = self.model(views.flatten(0, 1))
        except BaseException:
            self._pass.remove()
            raise
        finally:
            records, self._records, hooks, self._pass = self._records, None, self._pass, None
        losses = example_losses(out, labels, rows)
        # Parameters of layers that were never called are asked for too (none, usually): one that
        # still reaches the loss is used outside its layer (F.linear(x, self.fc.weight)), unseen by
        # any rule.
        called = {id(r.module) for r in records}
        uncalled = [(m, n, p) for m, own in self.layers.items() if id(m) not in called for n, p in own.items()]
        # One backward through every layer, asking only for the outputs of the layers that read
        # the data (every other layer's output gradient lies on the way to them): autograd skips
        # every weight gradient, and each layer's hook forms its norms as its output gradient
        # arrives (`_HookPass`).
        del out
        entries = [rec for rec in records if rec.reads_data and rec.out is not None]
        try:
            for rec in records:
                self._check_versions(rec)
            grads = torch.autograd.grad(losses.sum(), [rec.out for rec in entries] + [p for _, _, p in uncalled],
                                        allow_unused=True)
        finally:
            hooks.remove()
        # The graph's nodes below the entries never ran, and hold what they saved (e.g. the
        # input of the first layer) for as long as the graph lives: let it go.
        losses = losses.detach()
        self._check_outside(uncalled, grads[len(entries):])
        for rec, go in zip(entries, grads):  # a tensor hook need not fire for a tensor asked for itself
            if go is not None:
                hooks.hook(rec)(go)
        del grads
        norms2 = torch.zeros(rows.examples, dtype=losses.dtype, device=losses.device)
        for part in hooks.norms2:
            norms2 += part
        terms2 = sum(hooks.terms2) if hooks.terms2 else torch.zeros_like(norms2)
        alone = self.redo(norms2, terms2).nonzero().flatten().tolist()  # their norm is rounding noise
        norms = torch.sqrt(torch.clamp(norms2, min=0))
        exact: dict[nn.Parameter, torch.Tensor] = {}  # their clipped gradients, summed as they come
        for i in alone:
            clipped, norms[i:i + 1] = self._alone(views[i:i + 1], labels[i:i + 1], rows, clip_norm)
            exact = self._add(exact, clipped)
        factors = clip_factors(norms, clip_norm)
        factors[alone] = 0.0  # in the batch's sums with factor 0; their own clipped gradient is added
        if hooks.lean:
            return self._add(self._lean_sums(records, views, labels, rows, rng, factors), exact), losses, norms
        # Book-keeping: each rule kept what its clipped sum needs; a layer whose output reached
        # no loss has per-example gradients 0.
        sums: dict[nn.Parameter, torch.Tensor] = {}
        for rule in hooks.rules:
            for name, value in rule.clipped_sum(factors).items():
                param = self.layers[rule.m][name]
                sums[param] = value.reshape(param.shape)
        for rec in records:
            for param in self.layers[rec.module].values():
                if param not in sums:
                    sums[param] = torch.zeros_like(param)
        return self._add(sums, exact), losses, norms

    def _alone(self, views: torch.Tensor, labels: torch.Tensor, rows: Rows, clip_norm: float
               ) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
        """The clipped gradient of examples `views` (b, K, ...) and their norms, each example
        through the model alone (the torch-func reference, `per_example_grads`, not recorded:
        self._records is None), clipped by its own vector's norm (`clip_and_sum`): the
        contribution is exactly the vector whose norm was clipped, whatever the rounding (the
        rules' norm and clipped sum are two computations, which round apart where the norm is a
        difference of large terms: `cancels`)."""
        grads, _ = per_example_grads(self.model, views, labels, Rows(len(views), rows.views, rows.tiling))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            return clip_and_sum({params[n]: g for n, g in grads.items()}, clip_norm)

    @staticmethod
    def _add(sums: dict[nn.Parameter, torch.Tensor], exact: dict[nn.Parameter, torch.Tensor]
             ) -> dict[nn.Parameter, torch.Tensor]:
        for p, g in exact.items():
            sums[p] = sums[p] + g if p in sums else g
        return sums

    def _lean_sums(self, records: list[Record], views: torch.Tensor, labels: torch.Tensor, rows: Rows, rng: Optional[tuple],
                   factors: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """memory="lean": the clipped sum as the parameter gradients of sum_b c_b loss_b, by a
        second, ordinary forward and backward. The first backward did not keep its graph (so
        both passes free each layer's saved tensors as they go, as a non-private step does);
        the forward is repeated with the random state it had (dropout, stochastic depth draw
        the same), so the second pass differentiates the very function whose per-example
        norms gave the clip factors."""
        params = [p for rec in records for p in self.layers[rec.module].values()]
        devices = [views.device] if views.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _set_rng_state(views.device, rng)
            out = self.model(views.flatten(0, 1))  # not recorded: self._records is None
            losses = example_losses(out, labels, rows)
            del out
        grads = torch.autograd.grad((losses * factors.to(losses.dtype)).sum(), params, allow_unused=True)
        return {p: g if g is not None else torch.zeros_like(p) for p, g in zip(params, grads)}

    def _check_versions(self, rec: Record) -> None:
        for kind, t, v in (("output", rec.out, rec.version), ("input", rec.x, rec.x_version)):
            if t is not None and t._version != v:
                raise EngineError(f"privacy.engine={self.name}: the {kind} of layer {self._name(rec.module)} is "
                                  "modified in place after the layer (e.g. ReLU(inplace=True)), which corrupts "
                                  "what its rule reads; make that operation out of place")

    def _check_outside(self, uncalled: list, grads) -> None:
        outside = [f"{self.names[m]}.{n}" for (m, n, _), g in zip(uncalled, grads) if g is not None]
        if outside:
            raise EngineError(f"privacy.engine={self.name}: {', '.join(outside)} reach the loss although their layer "
                              "is never called (a parameter used outside its layer's forward, e.g. F.linear(x, "
                              "self.fc.weight), which no per-layer rule sees); call the layer, or use "
                              "privacy.engine=torch-func")

    def _chunks(self, rec: Record, go: torch.Tensor, rows: Rows, lean: bool):
        """One layer's rules on consecutive chunks of its examples (rows put example-major), as a
        list of (first, end) and a function that builds the rule of examples [first, end).

        On a CPU a chunk keeps its input, output gradient and the rule's own temporaries
        (`transient`, e.g. a conv's per-example gradients) within _CACHE_BYTES, except for ghost
        norm (`cache_chunk`): an instantiating rule passes over them several times (once per
        kernel offset, then for the norms), and from the cache those passes run 1.2-2x faster
        than from memory (`experiments/bench_layer_rules.py`). dpwa-lean's chunks also keep the
        temporaries within a quarter of the layer's output gradient, which backward holds anyway."""
        x, out, go = self._example_major(rec, go, rows)
        b = rows.examples
        r = x.shape[0] // b  # rows per example
        mode = "auto-norms" if lean and self.mode == "auto" else self.mode

        def rule(i: int, j: int):
            return rule_for(Record(rec.module, x[i * r:j * r], None if out is None else out[i * r:j * r],
                                   rec.version, shared=rec.shared, lean=lean), go[i * r:j * r], j - i, mode)
        key = (rec.module, r, tuple(x.shape[1:]), mode)
        sizes = self._sizes.get(key)
        if sizes is None:  # once per layer and shape, not on every step
            first = rule(0, 1)
            self._note(rec.module, first)
            sizes = self._sizes[key] = (transient(first, x[:r]), cache_chunk(first, x[:r], go[:r]))
        per, cpu_chunk = sizes
        chunk = go.numel() // 4 // max(per, 1) if lean else b
        cpu = x.device.type == "cpu"
        if cpu:
            chunk = min(chunk, cpu_chunk)
        if self.max_chunk is not None and (lean or (cpu and cpu_chunk < sys.maxsize)):
            chunk = min(chunk, self.max_chunk)
        return even_chunks(b, chunk), rule

    def _lean_norms2(self, rec: Record, go: torch.Tensor, rows: Rows) -> torch.Tensor:
        """One layer's per-example squared norms, chunk by chunk, each chunk's rule let go of
        before the next is built."""
        bounds, rule = self._chunks(rec, go, rows, lean=True)
        norms2, terms2 = [], []
        for i, j in bounds:
            part = rule(i, j)
            norms2.append(part.norms2())
            terms2.append(terms2_of(part, norms2[-1]))
        return torch.cat(norms2), torch.cat(terms2)

    def _rule(self, rec: Record, go: torch.Tensor, rows: Rows):
        """The layer's rule (`Chunks` of it, where a chunk holds fewer examples than the batch)."""
        bounds, rule = self._chunks(rec, go, rows, lean=False)
        if len(bounds) == 1:
            return rule(*bounds[0])
        return Chunks([rule(i, j) for i, j in bounds], [j - i for i, j in bounds])

    def plan_memory(self, views: torch.Tensor, examples: int) -> str:
        """memory="auto": choose once, for chunks of `examples` examples, from the shapes of
        `views` (b, K, ...), so that the run is fast or lean throughout. The trainer calls it
        before any private chunk with one public input of zeros and its physical batch size:
        the first chunk's own size follows the secret Poisson sampling (an empty first batch
        would leave no choice at all), and the choice is written in the run's metrics. Returns
        the mode."""
        if self.memory == "auto":
            held, saved = self._held_bytes(views)
            self.memory = _choose_memory(held * examples // len(views), saved * examples // len(views), views.device)
        return self.memory

    def _held_bytes(self, views: torch.Tensor) -> tuple[int, int]:
        """(what the fast mode's records would hold for this chunk: its layers' inputs, outputs
        and output gradients; what the forward itself saves for backward, about its layers'
        inputs), from the shapes of a forward without autograd, so that memory="auto" runs
        exactly the fast or the lean mode from the first chunk on, the paths the probe checks
        (`dpwa.engines.PATHS`). Its random draws (the CPU's and the device's generator) are
        put back after it; Python-side effects of a forward (a counter, a logging hook) happen
        once more, on the first chunk only."""
        held = [0, 0]

        def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            held[0] += (inputs[0].numel() + 2 * output.numel()) * output.element_size()
            held[1] += inputs[0].numel() * output.element_size()

        handles = [m.register_forward_hook(count) for m in self.layers]
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[views.device] if views.device.type == "cuda" else []):
                self.model(views.flatten(0, 1))
        finally:
            for h in handles:
                h.remove()
        return held[0], held[1]

    def _note(self, module: nn.Module, rule: object) -> None:
        ghost = getattr(rule, "ghost", None)
        self.plan.setdefault(self.names.get(module, "?"), type(rule).__name__ if ghost is None else
                             "ghost norm" if ghost else "instantiated")

    def _example_major(self, rec: Record, go: torch.Tensor, rows: Rows):
        """(input, output or None, output gradient) of a layer, rows put example-major."""
        what = f"the input of layer {self._name(rec.module)}"
        out = None if rec.out is None else rows.example_major(rec.out.detach(), what)
        return rows.example_major(rec.x, what), out, rows.example_major(go.detach(), what)


class _HookPass:
    """One chunk's backward hooks: one per recorded layer output, which turns the output's
    gradient into that layer's per-example squared norms once (however many uses the output
    has), then lets go of the layer's record.

    lean=False (dpwa-fast): the layer's rule is built on the whole chunk (on a CPU, as
    `Chunks` of cache-sized groups of its examples) and kept for the book-kept clipped sum,
    holding only what that needs (the input and output gradient, or
    the per-example gradients when those are smaller, e.g. a GroupNorm's (B, C)). Every
    layer's output gradient is therefore released as soon as its layer is done with it, and
    each rule's temporaries (a conv's Gram matrices) live one layer at a time.
    lean=True (dpwa-lean): norms only, in chunks of examples (`FastEngine._lean_norms2`); the
    record lets go of its tensors too.
    """

    def __init__(self, engine: FastEngine, rows: Rows, *, lean: bool) -> None:
        self.engine, self.rows, self.lean = engine, rows, lean
        self.handles: list = []
        self.norms2: list[torch.Tensor] = []
        self.terms2: list[torch.Tensor] = []  # the rules' `terms2` (those that give one), for `cancels`
        self.rules: list = []
        self.done: set[int] = set()

    def hook(self, rec: Record):
        def fire(go: torch.Tensor) -> None:
            if id(rec) in self.done:
                return
            self.done.add(id(rec))
            if self.lean:
                norms2, terms2 = self.engine._lean_norms2(rec, go, self.rows)
            else:
                rule = self.engine._rule(rec, go, self.rows)
                norms2 = rule.norms2()
                terms2 = getattr(rule, "terms2", None)  # the fast mode: ghost norm's alone
                self.rules.append(rule)  # it holds what its clipped sum still needs
            rec.x = rec.out = None  # autograd frees its own references as it goes: so may we
            self.norms2.append(norms2)
            if terms2 is not None:
                self.terms2.append(terms2)
        return fire

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _rng_state(device: torch.device) -> tuple:
    """The random state a forward on `device` draws from: the CPU generator's, and the
    device's own for CUDA."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(device: torch.device, state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _choose_memory(held: int, saved: int, device: torch.device) -> str:
    """Lean when the fast mode's records would take more than half of what is free once the
    forward has saved its tensors."""
    free = _free_bytes(device)
    return "lean" if free is not None and held > (free - saved) / 2 else "fast"


def _free_bytes(device: torch.device) -> Optional[int]:
    """Memory free now on `device`: CUDA's own count, or Linux's MemAvailable; None if unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
