"""The probe (`dpwa.probe.probe`) on every model that a newcomer's trial found to break the
guarantee silently or to fail only after the ledger reservation, with every engine.

Each case either is refused with a `ProbeError` (a UsageError: exit 2, raised before any
charge) whose message names the layer, parameter or layout at fault, or passes, and then the
engine is checked here again, independently of the probe, against a loop over single examples
(float64, 1e-5 relative). Models are tiny (8x8 inputs) so the whole table runs in seconds.
"""

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpwa.engines import ENGINES, FastEngine, make_engine
from dpwa.errors import UsageError
from dpwa.models.nfnet import ScalarGain
from dpwa.probe import ProbeError, probe
from dpwa.rows import Tiling

C, S, CLASSES = 2, 8, 3  # input channels, input size, classes
PASS = None
FAST, FUNC, HOOKS, FUNCTORCH, GHOST = "dpwa-fast", "torch-func", "opacus-hooks", "opacus-functorch", "opacus-ghost"
LEAN = "dpwa-lean"  # dpwa-fast's checks and rules, another backward: expected to behave as FAST in every cell


def head(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(4 * channels, CLASSES))


class Lambda(nn.Module):
    """A parameter-free step written in forward code (what a user's model does between layers)."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class FunctionalBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(C, 4, 3, padding=1), head(4)

    def forward(self, x):
        return self.head(F.batch_norm(self.conv(x), None, None, training=True))


class BatchMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(C, 4, 3, padding=1), head(4)

    def forward(self, x):
        h = self.conv(x)
        return self.head(h - h.mean(0))


class WeightOutside(nn.Module):
    """fc's weight is also used outside fc (a per-layer hook sees only fc's own use)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(C, 2, 3, stride=2), nn.Linear(18, 18), nn.Linear(18, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.fc(h) + h @ self.fc.weight))


class ScaledLinear(nn.Linear):
    """A Linear subclass with an extra parameter and its own forward."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.scale = nn.Parameter(torch.ones(self.out_features))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.scale


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(C, 2, 3, stride=2), nn.Linear(18, 18), nn.Linear(18, 18)
        self.b.weight = self.a.weight
        self.out = nn.Linear(18, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.b(torch.tanh(self.a(h)))))


class OwnParameter(nn.Module):
    """A parameter of the model itself, used through F.linear: no layer holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(C, 2, 3, stride=2)
        self.w = nn.Parameter(torch.randn(CLASSES, 18) * 0.3)

    def forward(self, x):
        return F.linear(torch.tanh(self.conv(x)).flatten(1), self.w)


class LayerNeverCalled(nn.Module):
    """fc's parameters are used only through F.linear: its forward (and any hook) never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(C, 2, 3, stride=2), nn.Linear(18, CLASSES)

    def forward(self, x):
        return F.linear(torch.tanh(self.conv(x)).flatten(1), self.fc.weight, self.fc.bias)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(C, 2, 3, stride=2), nn.Linear(18, 18), nn.Linear(18, CLASSES)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.out(torch.tanh(self.fc(torch.tanh(self.fc(h)))))


class MemberTiled(nn.Module):
    """A FiLM-style ensemble of 2 members: every row runs once per member, member-major
    (`x.repeat(M, 1, 1, 1)`); `declared` is the tiling the model states, or None."""

    def __init__(self, declared) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(C, 4, 3, padding=1), head(4)
        self.register_buffer("film", torch.tensor([1.0, -0.5]))
        if declared is not None:
            self.dpwa_tiling = declared

    def forward(self, x):
        h = torch.tanh(self.conv(x))
        h = h.repeat(2, 1, 1, 1).view(2, *h.shape) * self.film.view(2, 1, 1, 1, 1)
        return self.head(h.flatten(0, 1))


def timm_std_convs():
    from timm.layers import StdConv2d, StdConv2dSame

    return nn.Sequential(StdConv2d(C, 4, 3), nn.Tanh(), StdConv2dSame(4, 4, 3, stride=2), nn.Tanh(),
                         StdConv2dSame(4, 4, 3, bias=True), head(4))


def timm_group_norm_act():
    from timm.layers import GroupNormAct

    return nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), GroupNormAct(4, 2),  # ReLU(inplace=True), timm's default
                         nn.Conv2d(4, 4, 3, padding=1), GroupNormAct(4, 2, act_layer="gelu"), head(4))


def padding_same():
    from timm.layers.conv2d_same import Conv2dSame

    return nn.Sequential(nn.Conv2d(C, 4, 4, padding="same"), nn.Tanh(), nn.Conv2d(4, 4, 3, padding="same", dilation=2),
                         nn.Tanh(), Conv2dSame(4, 4, 3, stride=2), head(4))


def conv(**kw):
    return nn.Sequential(nn.Conv2d(C, 4, 3, **kw), nn.Tanh(), head(4))


class BareGain(nn.Module):
    """A 0-dim parameter of a module without a rule (timm's raw skip-init gain is one)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.g, self.head = nn.Conv2d(C, 4, 3, padding=1), nn.Parameter(torch.tensor(0.7)), head(4)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x) * self.g))


def nf_micro_dm():
    """dpwa's tiny dm-NFNet: ScaledStdConv2dSame, SE, and the skip-init gains as 0-dim ScalarGains."""
    from dpwa.models import create_model

    return create_model("nf_micro_dm", in_channels=3, num_classes=CLASSES)


class RunningMean(nn.Module):
    """Keeps a running mean of its inputs, unused by its output (so it mixes no examples), in a
    frozen parameter or in a buffer written only while gradients are on: either way a statistic
    of the private batch, saved unnoised with the weights."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.conv, self.head, self.where = nn.Conv2d(C, 4, 3, padding=1), head(4), where
        if where == "buffer_written_with_gradients_only":
            self.register_buffer("stat", torch.zeros(C))
        else:
            self.stat = nn.Parameter(torch.zeros(C), requires_grad=False)

    def forward(self, x):
        if self.where == "frozen_parameter" or torch.is_grad_enabled():
            with torch.no_grad():
                self.stat.mul_(0.9).add_(0.1 * x.mean((0, 2, 3)))
        return self.head(torch.tanh(self.conv(x)))


STATE = r"parameter\(s\) stat change when the model runs on a batch \({}\)"


class KeepsAnInput(nn.Module):
    """Saves a copy of a private input where the weights file reads it: a buffer it registers
    on its first forward (a name the model did not have), or its `get_extra_state()`."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.conv, self.head, self.where, self.kept = nn.Conv2d(C, 4, 3, padding=1), head(4), where, None

    def forward(self, x):
        if self.where == "new_buffer":
            self.register_buffer("memo", x[0].detach().clone())
        else:
            self.kept = x[0].detach().clone()
        return self.head(torch.tanh(self.conv(x)))

    def get_extra_state(self):
        return {"kept": self.kept} if self.where == "extra_state" else None

    def set_extra_state(self, state):
        self.kept = state and state["kept"]


class OnlyWhenEvaluating(nn.Module):
    """Mixes examples, or writes a buffer, only in eval mode: what a charged validation accuracy
    or loss query runs the model in (batch statistics at test time)."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.conv, self.head, self.what = nn.Conv2d(C, 4, 3, padding=1), head(4), what
        self.register_buffer("seen", torch.zeros(C))

    def forward(self, x):
        h = self.conv(x)
        if not self.training:
            if self.what == "mixes":
                h = h - h.mean(0)
            else:
                self.seen.copy_(x.mean((0, 2, 3)))
        return self.head(torch.tanh(h))


# name -> (build, {engine: PASS, or a pattern its ProbeError must match}); every engine is in each row.
MIXES = r"mixes examples"
OUTSIDE_ANY_LAYER = MIXES + r".*the input of 'head' already mixes them: the mixing is in the forward code of the model"
TIED = r"b\.weight \(the same Parameter as a\.weight: tied weights\)"
IN_PLACE = r"output of '0' \(Conv2d\) is modified in place"
NEVER_SEEN = r"no per-example gradient for fc\.weight, fc\.bias: its layer's hooks never saw it"
MEMBERS = r"cannot fold the 2 members"
ALL_PASS = {e: PASS for e in ENGINES if e != LEAN}


def every(outcome):
    return {e: outcome for e in ENGINES if e != LEAN}


CASES = {
    "batchnorm_affine_false": (lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.BatchNorm2d(4, affine=False),
                                                     head(4)), every(MIXES + r".*in layer '1' \(BatchNorm2d\)")),
    "functional_batch_norm": (FunctionalBatchNorm, every(OUTSIDE_ANY_LAYER)),
    "batch_norm_that_fails_on_one_example": (
        lambda: nn.Sequential(nn.Conv2d(C, 2, 3, stride=2), nn.Flatten(), nn.BatchNorm1d(18, affine=False),
                              nn.Linear(18, CLASSES)),
        every(MIXES + r" in training mode: it runs on a batch but fails on example 0 alone")),
    "batch_mean": (BatchMean, every(OUTSIDE_ANY_LAYER)),
    "buffer_registered_in_forward": (lambda: KeepsAnInput("new_buffer"),
                                     every(r"new state memo appears when the model runs on a batch")),
    "input_kept_in_extra_state": (lambda: KeepsAnInput("extra_state"),
                                  every(r"_extra_state change when the model runs on a batch")),
    "mixes_only_in_eval_mode": (lambda: OnlyWhenEvaluating("mixes"),
                                every(MIXES + r" in evaluation mode.*the mixing is in the forward code")),
    "writes_a_buffer_only_in_eval_mode": (lambda: OnlyWhenEvaluating("writes"), every(
        r"parameter\(s\) seen change when the model runs on a batch \(forwards without gradients in evaluation mode\)")),
    "running_mean_in_a_frozen_parameter": (lambda: RunningMean("frozen_parameter"),
                                           every(STATE.format("forwards without gradients in evaluation mode"))),
    "running_mean_written_with_gradients_only": (lambda: RunningMean("buffer_written_with_gradients_only"),
                                                 every(STATE.format("a forward and backward per example"))),
    "reflect_padding": (lambda: conv(padding=1, padding_mode="reflect"),
                        {**ALL_PASS, HOOKS: r"wrong clipped gradients for 0\.weight",
                         GHOST: r"wrong clipped gradients for 0\.weight"}),
    "weight_used_outside_its_layer": (WeightOutside,
                                      {**every(r"wrong clipped gradients for .*fc\.weight"), FUNC: PASS}),
    "linear_subclass_with_own_forward": (
        lambda: nn.Sequential(nn.Conv2d(C, 2, 3, stride=2), nn.Flatten(), ScaledLinear(18, CLASSES)),
        {**ALL_PASS, FAST: r"2\.weight \(no per-example rule for ScaledLinear: it subclasses Linear with its own "
                           r"forward.*2\.scale"}),
    "timm_std_conv": (timm_std_convs, ALL_PASS),
    "timm_group_norm_act": (timm_group_norm_act, ALL_PASS),
    "tied_weights": (Tied, {**ALL_PASS, FAST: TIED, GHOST: r"a\.weight is used twice in one forward pass"}),
    "parameter_of_the_model_itself": (OwnParameter,
                                      {**ALL_PASS, FAST: r"\bw \(no per-example rule for OwnParameter\)"}),
    "layer_used_only_through_F_linear": (LayerNeverCalled, {
        FAST: r"fc\.weight, fc\.bias reach the loss although their layer is never called", FUNC: PASS,
        HOOKS: NEVER_SEEN, FUNCTORCH: NEVER_SEEN,
        GHOST: r"no per-example norm for fc\.weight, fc\.bias"}),
    "inplace_after_hooked_layer": (lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.ReLU(inplace=True), head(4)),
                                   {**every(IN_PLACE), FUNC: PASS,
                                    FAST: r"output of layer '0' \(Conv2d\) is modified in place"}),
    "layer_called_twice": (CalledTwice, {**ALL_PASS, FAST: r"layer 'fc' \(Linear\) is called twice",
                                         GHOST: r"fc\.weight is used twice in one forward pass"}),
    "padding_same": (padding_same, ALL_PASS),
    "zero_dim_gain": (lambda: nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), ScalarGain(torch.tensor(0.7)), nn.Tanh(),
                                            head(4)), ALL_PASS),
    "zero_dim_parameter_without_a_layer": (BareGain, {**ALL_PASS, FAST: r"\bg \(no per-example rule for BareGain\)"}),
    "nf_micro_dm_skipinit_gains": (nf_micro_dm, ALL_PASS),
    "member_major_tiling": (lambda: MemberTiled(Tiling(members=2, order="member-major")),
                            {FAST: PASS, FUNC: PASS, HOOKS: MEMBERS, FUNCTORCH: MEMBERS, GHOST: MEMBERS}),
    "tiling_not_declared": (lambda: MemberTiled(None), every(r"has 8 rows for 4 examples .*must declare it")),
    "tiling_declared_in_the_wrong_order": (lambda: MemberTiled(Tiling(members=2, order="example-major")),
                                           every(MIXES + r".*declare its order truly")),
}
SHAPES = {"nf_micro_dm_skipinit_gains": (3, 16, 16)}


def build(name):
    torch.manual_seed(0)
    return CASES[name][0](), dict(example_shape=SHAPES.get(name, (C, S, S)), views=1, num_classes=CLASSES, examples=4)


def loop_clipped_sum(model, x, labels, clip):
    """Each example alone through the model, plain autograd; Opacus's clip rule."""
    from dpwa.rows import Rows, example_losses, tiling_of

    params = [p for p in model.parameters() if p.requires_grad]
    one = Rows(1, x.shape[1], tiling_of(model))
    grads = [torch.autograd.grad(example_losses(model(xi), yi.view(1), one)[0], params, allow_unused=True)
             for xi, yi in zip(x, labels)]
    grads = [[torch.zeros_like(p) if g is None else g for g, p in zip(gs, params)] for gs in grads]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return {p: sum(f * gs[j] for f, gs in zip(factors, grads)) for j, p in enumerate(params)}, norms


CELLS = [(name, engine) for name in CASES for engine in ENGINES]


@pytest.mark.parametrize("name, engine", CELLS, ids=[f"{n}-{e}" for n, e in CELLS])
def test_probe_refuses_by_name_or_the_engine_is_exact(name, engine):
    model, kw = build(name)
    table = CASES[name][1]
    expected = table[FAST if engine == LEAN else engine]
    if expected is not None:
        with pytest.raises(ProbeError) as info:
            probe(model, engine, **kw)
        assert isinstance(info.value, UsageError) and info.value.exit_code == 2
        message = str(info.value)
        assert re.search(expected, message, re.S), message
        assert f"privacy.engine={engine}: privacy.engine={engine}" not in message
        return
    report = probe(model, engine, **kw)
    assert report.max_norm_error < 1e-5 and report.max_sum_error < 1e-5
    assert_engine_exact(model.double(), engine, kw["example_shape"])  # and independently of the probe


def assert_engine_exact(model, engine, example_shape):
    """The engine on the model itself against the loop (5 examples, float64); returns it."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 1, *example_shape, generator=g, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (5,), generator=g)
    want, norms = loop_clipped_sum(model, x, labels, clip=1.0)
    clip = float(norms.median())
    want, _ = loop_clipped_sum(model, x, labels, clip)
    eng = make_engine(engine, model)
    try:
        got, _, got_norms = eng.clipped_sum(x, labels, clip)
    finally:
        eng.remove()
    assert torch.allclose(got_norms, norms, rtol=1e-5, atol=1e-12)
    for p, w in want.items():
        assert (got.get(p, torch.zeros_like(w)) - w).abs().max() <= 1e-5 * w.abs().max() + 1e-12, tuple(w.shape)
    return eng


def test_dpwa_fast_is_probed_in_its_lean_mode_too(monkeypatch):
    """dpwa-fast turns lean at run time when its fast mode would not fit in memory, a path a
    probe of 4 examples never takes by itself; the probe checks both (`dpwa.engines.PATHS`),
    so a bug planted in the lean mode alone is refused, named."""
    real = FastEngine._lean_sums
    monkeypatch.setattr(FastEngine, "_lean_sums", lambda self, *a: {p: 1.01 * v for p, v in real(self, *a).items()})
    model, kw = build("timm_std_conv")
    with pytest.raises(ProbeError, match=r"^privacy.engine=dpwa-fast \(in its lean mode, .*\) is not exact on this "
                                         r"model.*wrong clipped gradients"):
        probe(model, FAST, **kw)
    probe(model, FUNC, **kw)  # the planted bug is dpwa's alone


def test_dpwa_fast_is_probed_with_examples_redone_alone_too(monkeypatch):
    """An example whose norm cancels in rounding is redone alone mid-run (`FastEngine._alone`,
    through torch.func), a path random probe inputs never take by themselves: a bug there, or
    a model torch.func cannot run, met the run after its reservation. The probe redoes every
    other example on one path, so a bug planted in it alone is refused, named."""
    real = FastEngine._alone

    def doubled(self, *a):
        clipped, norms = real(self, *a)
        return {p: 2 * v for p, v in clipped.items()}, norms

    monkeypatch.setattr(FastEngine, "_alone", doubled)
    model, kw = build("timm_std_conv")
    with pytest.raises(ProbeError, match=r"^privacy.engine=dpwa-fast \(every other example redone alone, as one whose "
                                         r"norm cancels in rounding is\) is not exact on this model.*wrong clipped"):
        probe(model, FAST, **kw)
    probe(model, FUNC, **kw)  # the planted bug is dpwa's alone


def test_dpwa_fast_is_probed_in_chunks_too(monkeypatch):
    """At large batches a CPU runs a layer's instantiating rule in cache-sized chunks of
    examples (`rules.Chunks`), which the probe's 4 examples would not need; the probe runs a
    path in chunks of 2, so a bug planted in the chunked code alone is refused, named."""
    from dpwa.engines.rules import Chunks

    real = Chunks.clipped_sum
    monkeypatch.setattr(Chunks, "clipped_sum", lambda self, c: {n: 1.5 * v for n, v in real(self, c).items()})
    model, kw = build("timm_std_conv")
    with pytest.raises(ProbeError, match=r"^privacy.engine=dpwa-fast \(in chunks of 2 examples, as large batches "
                                         r"run\) is not exact on this model.*wrong clipped gradients"):
        probe(model, FAST, **kw)


def _hooked(hook) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), head(4))
    model[0].register_forward_hook(hook)
    return model


KW = dict(example_shape=(C, S, S), views=1, num_classes=CLASSES)


def test_the_models_own_forward_hooks_are_probed():
    """The probe's copy keeps the model's own hooks: training runs them. One that subtracts the
    batch mean from a layer's output mixes examples (an example's influence on the clipped sum
    was 7 C when the probe ran without it); one that scales a layer's output changes what a
    per-layer rule must compute (dpwa-fast's hook sees the scaled output: norms off by up to
    5x), while torch-func differentiates the whole function, hook included, and is exact."""
    with pytest.raises(ProbeError, match=r"mix|depends on other examples|independen"):
        probe(_hooked(lambda m, i, o: o - o.mean(0, keepdim=True)), FAST, **KW, batch=16)
    with pytest.raises(ProbeError, match=r"privacy.engine=dpwa-fast is not exact on this model.*norms wrong"):
        probe(_hooked(lambda m, i, o: 5 * o), FAST, **KW)
    probe(_hooked(lambda m, i, o: 5 * o), FUNC, **KW)


def test_an_engines_own_hooks_are_not_copied_into_the_probe():
    """dpwa-fast's recording hooks on the original model (PrivateSGD builds its engine before
    its first step's probe) stay out of the probe's copy, which builds its own; the user's
    hook stays in."""
    from dpwa.probe import _clean_copy

    model = _hooked(lambda m, i, o: 5 * o)
    engine = make_engine(FAST, model)
    work = _clean_copy(model)
    assert len(model[0]._forward_hooks) == 2 and len(work[0]._forward_hooks) == 1
    x = torch.randn(2, C, S, S)
    assert torch.equal(work(x), model(x))  # the user's hook, copied
    engine.remove()
    model[0]._forward_hooks.clear()
    assert not torch.equal(work(x), model(x))


def test_dpwa_fast_auto_runs_a_probed_path_from_its_first_chunk():
    """memory="auto" (what privacy.engine=dpwa-fast builds) chooses before its first forward,
    so it runs the fast or the lean mode, both probed, from the start: a model they handle
    (an in-place ReLU after a conv, whose norms hook is on the output before the change)
    passes the probe and then trains, instead of failing at the first release after the
    reservation."""
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(inplace=True), head(4)).double()
    probe(model, FAST, **KW)
    assert assert_engine_exact(model, FAST, (C, S, S)).memory == "fast"


def test_dpwa_fast_auto_decides_for_the_public_chunk_size_not_the_first_chunks(monkeypatch):
    """The first chunk's size follows the secret sampling (a Poisson batch smaller than the
    physical batch is one smaller chunk), and the choice is written in the run's metrics: with
    plan_memory called, as the trainer calls it before the first chunk, a chunk of the physical
    batch size decides."""
    from dpwa.engines import fast

    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), nn.Tanh(), head(4)).double()
    views = torch.randn(64, 1, C, S, S, dtype=torch.float64)
    labels = torch.randint(0, CLASSES, (64,))
    held, saved = FastEngine(model)._held_bytes(views[:1])
    monkeypatch.setattr(fast, "_free_bytes", lambda device: saved * 45 + 2 * held * 45)  # fits 45 examples

    def chosen(first: int, chunk_examples) -> str:
        eng = FastEngine(model, memory="auto")
        if chunk_examples:
            eng.plan_memory(torch.zeros(1, 1, C, S, S, dtype=torch.float64), chunk_examples)
        try:
            eng.clipped_sum(views[:first], labels[:first], 1.0)
        finally:
            eng.remove()
        return eng.memory

    assert (chosen(30, None), chosen(60, None)) == ("fast", "lean")  # the first chunk's size decided
    assert chosen(30, 64) == chosen(60, 64) == "lean" and chosen(30, 40) == chosen(60, 40) == "fast"


def test_probe_leaves_the_model_alone():
    model, kw = build("timm_std_conv")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe(model, FAST, **kw)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.dtype == torch.float32 and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())


def test_trainable_parameter_without_gradient_is_refused():
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head, self.unused = nn.Conv2d(C, 4, 3, padding=1), head(4), nn.Linear(3, 3)

        def forward(self, x):
            return self.head(self.conv(x))

    model = Unused()
    with pytest.raises(ProbeError, match=r"unused\.weight, unused\.bias get no gradient"):
        probe(model, FUNC, example_shape=(C, S, S), views=1, num_classes=CLASSES)


def test_augmented_views_are_probed_per_example():
    """K = 2 views per example: the engines that fold views pass, opacus-ghost is refused by name."""
    model, kw = build("timm_group_norm_act")
    kw["views"] = 2
    for engine in (FAST, FUNC, HOOKS):
        probe(model, engine, **kw)
    with pytest.raises(ProbeError, match="augmult.k=2"):
        probe(model, GHOST, **kw)


def test_a_parameter_whose_gradient_is_zero_up_to_rounding_is_not_refused():
    """A conv bias before a GroupNorm of one channel per group has a zero gradient up to
    rounding: its relative error is measured against 1e-3 C, not against ~1e-17."""
    from dpwa.models import create_model

    model = create_model("cnn_small", in_channels=1, num_classes=10, groups=16)  # GroupNorm(16, 16)
    report = probe(model, "dpwa-fast", example_shape=(1, 8, 8), views=1, num_classes=10)
    assert report.max_sum_error < 1e-6


@pytest.mark.parametrize("layer, needle", [
    (lambda: nn.LazyBatchNorm2d(), r"BatchNorm mixes the examples.*GroupNorm"),
    (lambda: nn.LazyLinear(CLASSES), r"uninitialised lazy parameters .*lazy module \(nn\.Lazy\*\) must be initialised"),
])
def test_an_uninitialised_lazy_module_is_a_probe_error(layer, needle):
    """An uninitialised lazy parameter fails a copy or a cast with a raw error: the probe says
    what to do (exit 2), and names BatchNorm first when it is one."""
    model = nn.Sequential(nn.Conv2d(C, 4, 3, padding=1), layer(), nn.Flatten(), nn.LazyLinear(CLASSES))
    with pytest.raises(ProbeError, match=needle):
        probe(model, FAST, example_shape=(C, S, S), views=1, num_classes=CLASSES)
