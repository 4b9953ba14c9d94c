"""Every per-example clipping engine against a loop over single examples (float64, 1e-5
relative): per-example norms, clipped sums, and the final noised update, with and without
augmentation multiplicity, for every layer type dpwa's and timm's models use."""

import copy
import functools
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import ScaledStdConv2d, ScaledStdConv2dSame

from dpwa.engines import ENGINES, EngineError, FastEngine, fast, make_engine
from dpwa.engines.rules import Chunks
from dpwa.models import create_model
from dpwa.models.wrn import WideResNet
from dpwa.models.ws import WSConv2d
from dpwa.privacy import PrivateSGD, secret_generator


def loop_grads(model, views, labels):
    """For each example alone: the gradient of the mean loss over its K views, and its norm."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = [torch.autograd.grad(F.cross_entropy(model(x), y.expand(len(x))), params) for x, y in zip(views, labels)]
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in gs)) for gs in grads])
    return params, grads, norms


def clip_and_add(params, grads, norms, clip_norm):
    total = [torch.zeros_like(p) for p in params]
    for gs, norm in zip(grads, norms):
        factor = min(1.0, clip_norm / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, gs)]
    return dict(zip(params, total))


def loop_reference(model, views, labels, clip_norm):
    """For each example alone: gradient of the mean loss over its K views; norm; clip; sum."""
    params, grads, norms = loop_grads(model, views, labels)
    return clip_and_add(params, grads, norms, clip_norm), norms


def mixed_model():
    """Every layer kind: WS conv, grouped + strided conv, dilated WS conv, GroupNorm, timm's
    scaled-std convs (with gain, with TF 'SAME' padding), Linear."""
    return nn.Sequential(
        WSConv2d(3, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.Tanh(),
        ScaledStdConv2d(8, 8, 3, padding=1, groups=2), nn.GELU(),
        ScaledStdConv2dSame(8, 6, 3, stride=2), nn.Tanh(),
        WSConv2d(6, 6, 3, padding=2, dilation=2), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5))


def wrn():
    m = WideResNet(10, 1, in_channels=3, num_classes=5, groups=4)
    nn.init.normal_(m.head.weight, std=0.1)  # the zero-init head would zero most gradients
    return m


MODELS = {
    "mixed": (mixed_model, 3),
    "cnn_tanh_ws": (lambda: create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4,
                                         weight_standardization=True, ), 3),
    "scatter_cnn": (lambda: create_model("scatter_cnn", in_channels=18, num_classes=5, groups=9), 18),
    "wrn10_1": (wrn, 3),
}


def make_inputs(k, channels, b=5, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, k, channels, size, size, generator=g, dtype=torch.float64),
            torch.randint(0, 5, (b,), generator=g))


def assert_sums_close(got, want, rtol=1e-5):
    for p, w in want.items():
        g = got.get(p, torch.zeros_like(w))
        assert (g - w).abs().max() <= rtol * w.abs().max() + 1e-12, tuple(w.shape)


ENGINE_CASES = [("dpwa-fast", "auto"), ("dpwa-fast", "ghost"), ("dpwa-fast", "instantiate"), ("dpwa-fast", "chunked"),
                ("dpwa-lean", None), ("dpwa-lean", "chunked"), ("torch-func", None), ("opacus-hooks", None), ("opacus-functorch", None), ("opacus-ghost", None)]


@functools.lru_cache(maxsize=None)
def reference_case(model_name, k):
    """(model state, inputs, per-example gradients by parameter name, norms), computed once."""
    build, channels = MODELS[model_name]
    torch.manual_seed(0)
    model = build().double()
    views, labels = make_inputs(k, channels)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _, grads, norms = loop_grads(model, views, labels)
    return copy.deepcopy(model.state_dict()), views, labels, names, grads, norms


# opacus-ghost clips each view, so it runs with K = 1 only (its refusal of K > 1 is tested below).
CASES = [(e, m, k) for e, m in ENGINE_CASES for k in (1, 3) if not (e == "opacus-ghost" and k > 1)]


@pytest.mark.parametrize("engine, mode, k", CASES, ids=[f"{e}-{m}-K{k}" if m else f"{e}-K{k}" for e, m, k in CASES])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_clipped_sums_and_norms_match_single_example_loop(monkeypatch, model_name, engine, mode, k):
    """mode "chunked": every layer's rule (ghost norm's too, which a CPU runs on the whole batch)
    runs on chunks of at most two of the five examples (sizes 1, 2, 2), as a CPU's cache-sized
    chunks do at larger batches."""
    chunked = []
    if mode == "chunked":
        monkeypatch.setattr(fast, "cache_chunk", lambda *a: 2)
        monkeypatch.setattr(fast, "Chunks", lambda rules, sizes: chunked.append(sizes) or Chunks(rules, sizes))
    state, views, labels, names, grads, want_norms = reference_case(model_name, k)
    model = MODELS[model_name][0]().double()
    model.load_state_dict(state)
    by_name = dict(model.named_parameters())
    clip = float(want_norms.median())  # some examples clipped, some not: both branches of min(1, C/|g|)
    want = clip_and_add([by_name[n] for n in names], grads, want_norms, clip)
    eng = FastEngine(model, mode=mode) if mode in ("auto", "ghost", "instantiate") else make_engine(engine, model)
    got, losses, norms = eng.clipped_sum(views, labels, clip)
    eng.remove()
    if engine == "dpwa-fast" and mode == "chunked":
        assert chunked and all(sizes == [1, 2, 2] for sizes in chunked)
    assert torch.allclose(norms, want_norms, rtol=1e-5, atol=1e-12)
    assert_sums_close(got, want)
    assert losses.shape == (len(labels),)
    assert all(p.grad is None for p in model.parameters())  # engines leave no gradient behind


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_standardised_weight_is_not_reused_across_steps(monkeypatch, memory):
    """The chunks of a layer share its standardised weight within one step (`Record.shared`):
    after an in-place update through `p.data` (which no version counter sees), the next step's
    norms and clipped sums are the new weights' (the loop over single examples)."""
    monkeypatch.setattr(fast, "cache_chunk", lambda *a: 2)
    state, views, labels, _, _, _ = reference_case("cnn_tanh_ws", 1)
    model = MODELS["cnn_tanh_ws"][0]().double()
    model.load_state_dict(state)
    eng = FastEngine(model, memory=memory)
    eng.clipped_sum(views, labels, 1.0)
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(1.5).add_(0.1 * torch.randn_like(p))
    want, want_norms = loop_reference(model, views, labels, 1.0)
    got, _, norms = eng.clipped_sum(views, labels, 1.0)
    eng.remove()
    assert torch.allclose(norms, want_norms, rtol=1e-5, atol=1e-12)
    assert_sums_close(got, want)


@pytest.mark.parametrize("free, chosen", [(None, "fast"), (2**40, "fast"), (1, "lean")])
def test_memory_auto_turns_lean_when_fast_would_not_fit(monkeypatch, free, chosen):
    """dpwa-fast's memory="auto": fast unless what it holds exceeds half the free memory; then
    lean from the first chunk on (its hooks put on the outputs after that chunk's forward), and
    exact either way."""
    import dpwa.engines.fast as fast

    monkeypatch.setattr(fast, "_free_bytes", lambda device: free)
    state, views, labels, names, grads, want_norms = reference_case("wrn10_1", 3)
    model = MODELS["wrn10_1"][0]().double()
    model.load_state_dict(state)
    by_name = dict(model.named_parameters())
    clip = float(want_norms.median())
    want = clip_and_add([by_name[n] for n in names], grads, want_norms, clip)
    eng = make_engine("dpwa-fast", model)
    for _ in range(2):  # the first chunk decides; the second runs in the chosen mode from its forward
        got, _, norms = eng.clipped_sum(views, labels, clip)
        assert torch.allclose(norms, want_norms, rtol=1e-5, atol=1e-12)
        assert_sums_close(got, want)
    eng.remove()
    assert eng.memory == chosen and "memory" not in eng.plan and eng.name == "dpwa-fast"
    assert all(p.grad is None for p in model.parameters())


def test_lean_repeats_the_forward_with_its_randomness():
    """dpwa-lean's clipped sum comes from a second forward: with dropout in the model it must
    draw the masks of the first (whose per-example norms gave the clip factors), so it equals
    dpwa-fast's single-forward result from the same random state, and every example's clipped
    gradient stays within C."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Dropout(0.5), nn.Flatten(),
                          nn.Dropout(0.3), nn.Linear(6 * 8 * 8, 5)).double()
    views, labels = make_inputs(2, 3)
    results = {}
    for engine in ("dpwa-fast", "dpwa-lean"):
        eng = make_engine(engine, model)
        torch.manual_seed(7)
        results[engine] = eng.clipped_sum(views, labels, 0.05)
        eng.remove()
    (fast, fast_losses, fast_norms), (lean, lean_losses, lean_norms) = results["dpwa-fast"], results["dpwa-lean"]
    assert torch.equal(fast_losses, lean_losses) and torch.allclose(fast_norms, lean_norms, rtol=1e-10)
    assert bool((fast_norms > 0.05).all())  # every example clipped: a wrong mask would show in the sums
    assert_sums_close(lean, fast, rtol=1e-10)


def channels_last_views(views):
    """(B, K, C, H, W) whose every (C, H, W) view is stored channels-last, as a batch of
    channels-last images is once B and K are flattened."""
    return views.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("engine", ENGINES)
def test_noised_update_matches_reference(engine, layout):
    """The whole step (chunks, clipping, noise once per logical batch, / B, momentum SGD) with a
    fixed noise seed equals the loop reference plus the same noise. Channels-last input
    batches too: Opacus's conv rule is wrong on them (norms off by 7% on this model), and
    the probe checks on contiguous inputs, so the mechanism hands every engine contiguous ones."""
    torch.manual_seed(0)
    base = mixed_model().double()
    views, labels = make_inputs(1 if engine == "opacus-ghost" else 2, 3, b=6)
    if layout == "channels_last":
        views = channels_last_views(views)
    sigma, clip, b = 1.3, 4.5, 6.0
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9)
    sgd = PrivateSGD(model, opt, noise_multiplier=sigma, clip_norm=clip, expected_batch_size=b,
                     generator=secret_generator(7), engine=engine)
    sgd.step([(views[:4], labels[:4]), (views[4:], labels[4:])])
    ref = copy.deepcopy(base)
    sums, _ = loop_reference(ref, views, labels, clip)
    gen = secret_generator(7)
    for p in ref.parameters():  # Opacus draws noise parameter by parameter, in order
        noise = torch.normal(0, sigma * clip, p.shape, generator=gen, dtype=p.dtype)
        p.grad = (sums[p] + noise) / b
    torch.optim.SGD(ref.parameters(), lr=0.7, momentum=0.9).step()
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-10)


@pytest.mark.parametrize("engine", ENGINES)
def test_an_example_with_a_non_finite_gradient_counts_as_zero(engine):
    """One example with an inf pixel has NaN loss and gradient: summed with the others it made
    the release NaN whatever the noise, telling that it was drawn. The mechanism takes its
    clipped gradient as 0 (a function of it alone) and sums the rest as the loop does."""
    torch.manual_seed(0)
    base = mixed_model().double()
    views, labels = make_inputs(1 if engine == "opacus-ghost" else 2, 3, b=6)
    views[2, 0, 1, 4, 4] = float("inf")
    clip = 4.5
    model = copy.deepcopy(base)
    opt = torch.optim.SGD(model.parameters(), lr=0.7)
    sgd = PrivateSGD(model, opt, noise_multiplier=0.0, clip_norm=clip, expected_batch_size=6.0,
                     generator=secret_generator(7), engine=engine)
    out = sgd.step([(views[:4], labels[:4]), (views[4:], labels[4:])])
    keep = [0, 1, 3, 4, 5]
    sums, _ = loop_reference(base, views[keep], labels[keep], clip)
    for p, q in zip(base.parameters(), model.parameters()):
        assert torch.allclose(q, p - 0.7 * sums[p] / 6.0, rtol=1e-5, atol=1e-10)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert all(math.isfinite(v) for v in out.values())


@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
def test_frozen_parameters_get_no_per_example_gradients(mode):
    model = mixed_model().double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    model[-1].bias.requires_grad_(False)
    model[5].weight.requires_grad_(False)  # a scaled-std conv whose gain alone is trained
    views, labels = make_inputs(2, 3)
    want, want_norms = loop_reference(model, views, labels, 4.5)
    got, _, norms = FastEngine(model, mode=mode).clipped_sum(views, labels, 4.5)
    assert set(got) == set(want)
    assert torch.allclose(norms, want_norms, rtol=1e-5)
    assert_sums_close(got, want)


def test_unsupported_layer_and_inplace_are_refused():
    model = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.Flatten(), nn.LayerNorm(4 * 8), nn.Linear(4 * 8, 2))
    # every offending parameter is listed at once, before any data is touched
    with pytest.raises(EngineError, match=r"4 trainable parameter\(s\): 0.weight \(no per-example rule for Conv1d\), "
                                          r"0.bias .*2.weight \(no per-example rule for LayerNorm\), 2.bias "
                                          r".*torch-func"):
        FastEngine(model)
    inplace = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(EngineError, match="output of layer '0' \\(Conv2d\\) is modified in place"):
        FastEngine(inplace).clipped_sum(torch.randn(2, 1, 3, 8, 8), torch.tensor([0, 1]), 1.0)


def test_unknown_engine_and_ghost_with_augmult_are_refused():
    with pytest.raises(EngineError, match="privacy.engine must be one of"):
        make_engine("fastest", nn.Linear(2, 2))
    with pytest.raises(ValueError, match="augmult.k=2"):
        make_engine("opacus-ghost", nn.Linear(4, 2)).clipped_sum(torch.randn(3, 2, 4), torch.tensor([0, 1, 0]), 1.0)


def test_evaluation_and_copies_are_not_recorded():
    model = mixed_model()
    eng = FastEngine(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 8, 8))
    copy.deepcopy(model)(torch.randn(2, 3, 8, 8))  # e.g. the EMA copy
    assert eng._records is None


def test_all_engines_listed():
    assert set(ENGINES) == {e for e, _ in ENGINE_CASES}


@pytest.mark.parametrize("mode, memory", [("auto", "fast"), ("ghost", "fast"), ("auto", "lean"), ("instantiate", "lean")])
def test_a_norm_that_rounding_decides_is_redone_alone_and_its_contribution_stays_within_c(mode, memory):
    """Near-constant images through a conv before GroupNorm: ghost norm's sum over pairs of
    positions cancels to ~1e-7 of its terms, so float32 gave the norm as 0 while the book-kept
    (or second-backward) sum kept the whole gradient: an example's contribution was 6.7 C (a
    helper's review). Such examples (`cancels`) are redone alone, their norm that of the very
    vector added: each contribution <= C, norms as the float64 loop's, and an example whose
    norm does not cancel stays in the batch's sums."""
    from dpwa.engines.fast import cancels

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 32, 3, bias=False), nn.GroupNorm(32, 32), nn.Tanh(), nn.Flatten(),
                          nn.Linear(32 * 16, 5))
    model[1].requires_grad_(False)
    model[4].requires_grad_(False)  # only the conv trains: its norm is the example's
    exact = copy.deepcopy(model).double()
    eng = FastEngine(model, mode=mode, memory=memory)
    alone, real = [], eng._alone
    eng._alone = lambda *a: alone.append(1) or real(*a)
    g = torch.Generator().manual_seed(1)
    clip = 0.1
    try:
        for seed in range(6):
            x = 1.0 + torch.randn(1, 1, 32, 6, 6, generator=g) / 4000
            y = torch.randint(0, 5, (1,), generator=g)
            (want,) = torch.autograd.grad(F.cross_entropy(exact(x[0].double()), y), [exact[0].weight])
            sums, _, norms = eng.clipped_sum(x, y, clip)
            got = torch.sqrt(sum(v.double().square().sum() for v in sums.values()))
            assert float(got) <= clip * (1 + 1e-6), (seed, float(got) / clip)
            assert float(norms[0]) == pytest.approx(float(want.norm()), rel=1e-3)
        mixed = torch.cat([1.0 + torch.randn(2, 1, 32, 6, 6, generator=g) / 4000, torch.randn(2, 1, 32, 6, 6, generator=g)])
        labels = torch.randint(0, 5, (4,), generator=g)
        sums, _, norms = eng.clipped_sum(mixed, labels, 1e9)  # no clipping: the plain sum of the four gradients
        want = sum(torch.autograd.grad(F.cross_entropy(exact(mixed[i].double()), labels[i:i + 1]), [exact[0].weight])[0]
                   for i in range(4))
        # the near-constant ones' gradients in float32 carry ~1e-2 of their own norm in rounding
        assert float((sums[model[0].weight].double() - want).norm() / want.norm()) < 1e-3
        assert len(alone) == 6 + 2  # redone alone: the near-constant examples only
    finally:
        eng.remove()
    assert cancels(torch.tensor([-1.0, 0.5, 1e-3, float("nan"), 0.0]), torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])).tolist() \
        == [True, False, True, False, False]


def test_a_small_gain_next_to_its_bias_does_not_round_away_its_gradient():
    """A scaled WS conv's a . w_hat came from its output as (out - bias) / m: with the gain near 0
    (an NF conv without skip-init) that difference is rounding, and float32 got the gain's
    gradient 7% wrong at gain 1e-6 (a helper's review); the contraction is used there instead."""
    torch.manual_seed(0)
    conv = ScaledStdConv2d(16, 16, 1)
    with torch.no_grad():
        conv.gain.fill_(1e-6)
        conv.bias.fill_(1.0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.Tanh(), conv, nn.Tanh(), nn.Flatten(), nn.Linear(16 * 36, 5))
    exact = copy.deepcopy(model).double()
    x, y = torch.randn(4, 1, 8, 6, 6), torch.randint(0, 5, (4,))
    want = sum(torch.autograd.grad(F.cross_entropy(exact(x[i].double()), y[i:i + 1]), [exact[2].gain])[0]
               for i in range(4))
    eng = FastEngine(model, mode="ghost")
    try:
        sums, _, _ = eng.clipped_sum(x, y, 1e9)
    finally:
        eng.remove()
    assert float((sums[conv.gain].double() - want).norm() / want.norm()) < 1e-5


def test_an_empty_chunk_gives_zero_sums():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    eng = FastEngine(model)
    try:
        sums, losses, norms = eng.clipped_sum(torch.zeros(0, 1, 3, 2, 2), torch.zeros(0, dtype=torch.long), 1.0)
    finally:
        eng.remove()
    assert len(losses) == len(norms) == 0 and all(float(v.abs().sum()) == 0 for v in sums.values()) and len(sums) == 2


def test_the_ghost_cancellation_experiment_measures_what_its_table_says():
    """`experiments/ghost_cancellation.py` (the README's numbers) on a tiny case: the float32
    norms it reads are the engine's before the check (through its `redo`), and a near-constant
    input is counted as redone alone."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "experiments" / "ghost_cancellation.py"
    spec = importlib.util.spec_from_file_location("ghost_cancellation", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(8, 8, 3, bias=False), nn.GroupNorm(8, 8), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 16, 3))
    near = 1.0 + torch.randn(3, 8, 6, 6) / 4000
    m = module.measured(conv, near, torch.tensor([0, 1, 2]))
    assert m["norms2"].shape == m["terms2"].shape == m["exact"].shape == (3,)
    cells = [c.strip() for c in module.row("near-constant", m).split("|")]
    assert cells[2] == "3" and cells[5] == "3"  # examples, redone alone
    assert float(cells[3]) < 1e-2
