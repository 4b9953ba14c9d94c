"""Sparse masks (dpwa.sparsity) and the SET / RigL methods under DP: ERK and uniform budgets,
drop and regrowth, masked weights and optimizer state, growth from released gradients only,
one release per step, and kill-and-resume."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.config import ConfigError, load_config
from dpwa.mechanism import Release
from dpwa.methods import METHODS, Step, make_method
from dpwa.models.ws import WSConv2d
from dpwa.sparsity import (Masks, drop_fraction, erk_densities, gradual_density, is_prune_step, is_update_step,
                           layer_counts, prunable, uniform_densities)
from dpwa.train import train
from tests.conftest import ROOT
from tests.dpwa.test_train import final_weights, tiny

SHAPES = [(64, 243, 3, 3), (64, 64, 3, 3), (128, 64), (10, 128), (8, 3, 3, 3)]  # scatter_cnn-like, and a tiny stem


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 4, 40), nn.Tanh(),
                         nn.Linear(40, 30), nn.Linear(30, 5))


def config(*extra, name="rigl"):
    return load_config(None, [f"method.name={name}", "method.sparsity_density=0.3", "method.sparsity_end=20",
                              "method.sparsity_update_every=1", "method.sparsity_fraction=0.5", "privacy.epsilon=1",
                              "train.steps=20", *extra])


def releases(net, steps, seed=0):
    """Dense "released" gradients for every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    return [Release({p: torch.randn(p.shape, generator=g) for p in params}, 0.0, 0) for _ in range(steps)]


def test_erk_densities_follow_the_formula_and_meet_the_budget_exactly():
    sizes = [math.prod(s) for s in SHAPES]
    for density in (0.05, 0.2, 0.5):
        d = erk_densities(SHAPES, density)
        raw = [sum(s) / n for s, n in zip(SHAPES, sizes)]
        sparse = [i for i in range(len(SHAPES)) if d[i] < 1]
        dense = [i for i in range(len(SHAPES)) if d[i] == 1]
        # eps solved over the sparse layers after the dense ones take their full size (the reference's rhs / divisor)
        eps = (density * sum(sizes) - sum(sizes[i] for i in dense)) / sum(raw[i] * sizes[i] for i in sparse)
        for i in sparse:
            assert d[i] == pytest.approx(eps * raw[i])
        assert all(raw[i] >= max(raw[j] for j in sparse) for i in dense)  # the largest ratios went dense
        assert sum(x * n for x, n in zip(d, sizes)) == pytest.approx(density * sum(sizes))
        counts = layer_counts(sizes, d, density)
        assert sum(counts) == round(density * sum(sizes))
        assert all(abs(c - x * n) < 1 and c <= n for c, x, n in zip(counts, d, sizes))
    assert erk_densities(SHAPES, 0.2)[-1] == erk_densities(SHAPES, 0.2)[-2] == 1.0  # head and stem dense at 0.2


def test_uniform_densities_meet_the_budget_exactly_and_masks_have_the_counts():
    sizes = [math.prod(s) for s in SHAPES]
    counts = layer_counts(sizes, uniform_densities(SHAPES, 0.1), 0.1)
    assert sum(counts) == round(0.1 * sum(sizes)) and all(abs(c - 0.1 * n) < 1 for c, n in zip(counts, sizes))
    for init in ("erk", "uniform"):
        net = model()
        masks = Masks.for_model(net, density=0.3, init=init, seed=3)
        total = sum(m.numel() for m in masks.masks)
        assert sum(masks.active) == round(0.3 * total)
        for p, m in zip(masks.params, masks.masks):
            assert torch.all(p[~m] == 0)  # applied at construction
        again = Masks.for_model(model(), density=0.3, init=init, seed=3)
        assert all(torch.equal(a, b) for a, b in zip(masks.masks, again.masks))  # public, seeded randomness


def test_prunable_weights_are_conv_and_linear_kernels_without_the_classifier():
    net = model()
    assert list(prunable(net)) == ["0.weight", "3.weight", "5.weight"]  # no biases, no GroupNorm, no head
    assert list(prunable(net, classifier=True)) == ["0.weight", "3.weight", "5.weight", "6.weight"]
    with pytest.raises(ConfigError, match="weight_standardization=false"):
        prunable(nn.Sequential(WSConv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 2)))


def test_the_drop_fraction_decays_by_cosine_to_zero_at_the_end_step():
    assert drop_fraction(0, fraction=0.3, end=100) == pytest.approx(0.3)
    assert drop_fraction(50, fraction=0.3, end=100) == pytest.approx(0.15)
    assert drop_fraction(100, fraction=0.3, end=100) == drop_fraction(150, fraction=0.3, end=100) == 0
    assert [t for t in range(1, 60) if is_update_step(t, every=15, end=50)] == [15, 30, 45]


def test_drop_and_grow_keep_the_active_count_of_every_layer():
    net = model()
    masks = Masks.for_model(net, density=0.3, seed=1)
    with torch.no_grad():
        for p in masks.params:
            p.normal_()
    masks.apply()
    before = masks.active
    moved = 0
    for _ in range(4):
        old = [m.clone() for m in masks.masks]
        moved += masks.update(0.4, masks.random_scores())
        assert masks.active == before
        moved_now = sum(int((m & ~o).sum()) for m, o in zip(masks.masks, old))
        assert moved_now > 0
    assert moved > 0
    state = masks.state_dict()
    other = Masks.for_model(model(), density=0.3, seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.masks, masks.masks))
    assert torch.equal(other.random_scores()[0], masks.random_scores()[0])  # the generator resumes too


@pytest.mark.parametrize("optim", [["optim.momentum=0.9", "optim.weight_decay=0.1", "optim.nesterov=true"],
                                   ["optim.name=adam", "optim.weight_decay=0.1"],
                                   ["optim.name=adamw", "optim.weight_decay=0.1"]])
@pytest.mark.parametrize("name", ["set", "rigl"])
def test_masked_weights_and_their_optimizer_state_stay_exactly_zero(name, optim):
    net = model()
    cfg = config(*optim, "method.sparsity_update_every=2", name=name)
    method = make_method(cfg, net)
    grown = 0
    for t, out in enumerate(releases(net, 6)):
        grown += method.step(Step(index=t, lr=0.1, release=lambda out=out: out))["sparsity_grown"]
        for p, m in zip(method.masks.params, method.masks.masks):
            assert torch.all(p[~m] == 0) and (p[m] != 0).float().mean() > 0.5
            state = [v for v in method.optimizer.state[p].values() if torch.is_tensor(v) and v.shape == p.shape]
            assert state and all(torch.all(v[~m] == 0) for v in state)
    assert grown > 0  # the masks moved (updates after steps 2, 4, 6)


def test_grown_weights_start_at_zero_with_zero_momentum():
    net = model()
    method = make_method(config("optim.momentum=0.9", "method.rigl_grow=momentum",
                                "method.sparsity_update_every=3"), net)
    outs = releases(net, 3)
    for t in range(2):
        method.step(Step(index=t, lr=0.1, release=lambda t=t: outs[t]))
    old = [m.clone() for m in method.masks.masks]
    assert method.step(Step(index=2, lr=0.1, release=lambda: outs[2]))["sparsity_grown"] > 0
    for p, m, o in zip(method.masks.params, method.masks.masks, old):
        fresh = m & ~o
        assert fresh.any()
        assert torch.all(p[fresh] == 0) and torch.all(method.optimizer.state[p]["momentum_buffer"][fresh] == 0)


def expected_masks(weights, old_masks, scores, fraction):
    """RigL's update written out with topk: keep the n - k largest |w| of the n active, grow the
    k largest scores among the rest."""
    out = []
    for w, m, s in zip(weights, old_masks, scores):
        n = int(m.sum())
        k = int(fraction * n)
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[torch.topk(torch.where(m.view(-1), w.abs().view(-1), torch.tensor(-1.0)), n - k).indices] = True
        grown = torch.topk(torch.where(kept, torch.tensor(-math.inf), s.abs().view(-1)), k).indices
        new = kept.clone()
        new[grown] = True
        out.append(new.view_as(m))
    return out


def test_rigl_dense_noisy_grows_the_largest_released_gradients_among_the_inactive_weights():
    net = model()
    method = make_method(config("optim.lr=0.1"), net)
    (out,) = releases(net, 1, seed=5)
    old = [m.clone() for m in method.masks.masks]
    w1 = [(p - 0.1 * out.grads[p] * m).detach() for p, m in zip(method.masks.params, old)]  # the SGD step, masked
    method.step(Step(index=0, lr=0.1, release=lambda: out))
    f = drop_fraction(1, fraction=0.5, end=20)
    want = expected_masks(w1, old, [out.grads[p] for p in method.masks.params], f)
    assert all(torch.equal(a, b) for a, b in zip(method.masks.masks, want))
    assert any(not torch.equal(a, b) for a, b in zip(method.masks.masks, old))


def test_rigl_momentum_grows_by_the_momentum_of_the_dense_releases():
    net = model()
    method = make_method(config("optim.momentum=0.5", "method.rigl_grow=momentum", "method.sparsity_update_every=3"),
                         net)
    outs = releases(net, 3, seed=6)
    buf = [sum(0.5 ** (2 - t) * outs[t].grads[p] for t in range(3)) for p in method.masks.params]
    for t in range(2):
        method.step(Step(index=t, lr=0.1, release=lambda t=t: outs[t]))
    old, seen, update = [m.clone() for m in method.masks.masks], [], method.masks.update

    def spy(fraction, scores, optimizer=None):  # the iterate the update drops from
        seen.append([p.detach().clone() for p in method.masks.params])
        return update(fraction, scores, optimizer)

    method.masks.update = spy
    method.step(Step(index=2, lr=0.1, release=lambda: outs[2]))
    want = expected_masks(seen[0], old, buf, drop_fraction(3, fraction=0.5, end=20))
    for a, b, x, y in zip(method.masks.masks, want, method.momentum, buf):
        assert torch.equal(a, b)
        torch.testing.assert_close(x, y)


def test_gradual_pruning_follows_the_cubic_schedule_to_the_budget():
    d = [gradual_density(t, initial=0.9, final=0.3, start=4, end=10) for t in range(12)]
    assert d[:5] == [0.9] * 5 and d[10:] == [0.3, 0.3]
    assert d[7] == pytest.approx(0.3 + 0.6 * 0.5 ** 3)  # Zhu & Gupta: halfway, 1/8 of the way left
    assert all(a > b for a, b in zip(d[4:10], d[5:11]))
    assert [t for t in range(20) if is_prune_step(t, every=4, start=1, end=11)] == [5, 9, 11]  # and the end step


def test_granet_prunes_the_smallest_active_weights_over_all_layers_to_the_schedule():
    """Against a float64 loop: after each prune step the masks keep exactly the schedule's count
    of the largest |w| among the weights active before it, over all layers together."""
    net = model()
    cfg = config("optim.momentum=0.9", "method.sparsity_init_density=1.0", "method.sparsity_prune_start=1",
                 "method.sparsity_prune_end=7", "method.sparsity_update_every=2", "method.sparsity_end=1")
    method = make_method(cfg, net)  # sparsity_end 1: no routine drop/grow, the prune alone moves the masks
    total = sum(p.numel() for p in method.masks.params)
    assert sum(method.masks.active) == total  # dense start
    seen, prune = [], method.masks.prune_global

    def spy(count, optimizer=None):
        seen.append(([p.detach().double().clone() for p in method.masks.params], [m.clone() for m in method.masks.masks]))
        return prune(count, optimizer)

    method.masks.prune_global = spy
    pruned_at = []
    for t, out in enumerate(releases(net, 9)):
        stats = method.step(Step(index=t, lr=0.1, release=lambda out=out: out))
        if "sparsity_pruned" not in stats:
            continue
        pruned_at.append(t + 1)
        density = gradual_density(t + 1, initial=1.0, final=0.3, start=1, end=7)
        count = round(0.3 * total) if t + 1 == 7 else round(density * total)
        assert sum(method.masks.active) == count and stats["sparsity_density"] == pytest.approx(count / total)
        weights, before = seen[-1]
        ranked = sorted(((abs(float(w.reshape(-1)[j])), i, j) for i, (w, m) in enumerate(zip(weights, before))
                         for j in range(w.numel()) if m.reshape(-1)[j]), key=lambda e: -e[0])
        want = [torch.zeros(w.numel(), dtype=torch.bool) for w in weights]
        for _, i, j in ranked[:count]:
            want[i][j] = True
        for p, m, w in zip(method.masks.params, method.masks.masks, want):
            assert torch.equal(m.reshape(-1), w)
            assert torch.all(p[~m] == 0) and torch.all(method.optimizer.state[p]["momentum_buffer"][~m] == 0)
    assert pruned_at == [3, 5, 7]
    assert sum(method.masks.active) == round(0.3 * total) == method.budget  # the budget from the end step on


def test_a_mask_update_step_makes_exactly_one_release():
    net = model()
    for name in ("set", "rigl"):
        method = make_method(config(name=name), net)
        calls = []
        outs = releases(net, 5)

        def release():
            calls.append(1)
            return outs[len(calls) - 1]

        for t in range(5):  # every step is a mask-update step here
            assert method.step(Step(index=t, lr=0.1, release=release))["sparsity_grown"] > 0
        assert len(calls) == 5
        assert METHODS[name].releases(config(name=name), 20) == METHODS["dpsgd"].releases(config(name=name), 20) == 20


SPARSE = ["model.weight_standardization=false", "method.sparsity_end=9", "method.sparsity_update_every=2",
          "optim.momentum=0.9"]
RIGL = ["method.name=rigl", "method.rigl_grow=momentum", *SPARSE]


def test_sparse_runs_charge_what_dpsgd_charges_and_resume_exactly(tmp_path):
    runs = {}
    for name, extra in (("dpsgd", ["model.weight_standardization=false", "optim.momentum=0.9"]),
                        ("set", ["method.name=set", *SPARSE]), ("rigl", RIGL)):
        led = tmp_path / f"{name}.sqlite"
        runs[name] = train(tiny(tmp_path / name, *extra), ledger_path=str(led), progress=False)
        runs[name]["spent"] = Ledger(str(led)).run(runs[name]["run_id"]).spent
    for name in ("set", "rigl"):
        assert runs[name]["releases"] == runs["dpsgd"]["releases"] == 12
        assert runs[name]["spent"] == runs["dpsgd"]["spent"] and runs[name]["epsilon"] == runs["dpsgd"]["epsilon"]
    rows = [json.loads(line) for line in (Path(runs["rigl"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["sparsity_grown"] > 0] == [2, 4, 6, 8]

    # killed at step 6: resumes from the checkpoint of step 4 and redoes the updates after 6 and 8
    led = str(tmp_path / "b.sqlite")
    stopped = train(tiny(tmp_path / "b", *RIGL), ledger_path=led, progress=False, stop_after=6)
    assert final_weights(stopped["run_dir"])["step"] == 4
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)
    a, b = final_weights(runs["rigl"]["run_dir"]), final_weights(resumed["run_dir"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, mask in a["method"]["masks"]["masks"].items():
        assert torch.equal(mask, b["method"]["masks"]["masks"][key]), key
        assert torch.all(a["model"][key][~mask] == 0)
    for x, y in zip(a["method"]["growth_momentum"], b["method"]["growth_momentum"]):
        assert torch.equal(x, y)
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent == runs["rigl"]["spent"]  # one charge, 12 releases


def test_sparse_fields_belong_to_set_and_rigl():
    with pytest.raises(ConfigError, match="method.sparsity_density is for method.name=set / rigl / edst / suptickets, not 'dpsgd'"):
        load_config(None, ["method.sparsity_density=0.1", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.rigl_grow is for method.name=rigl, not 'set'"):
        config("method.rigl_grow=momentum", name="set")
    with pytest.raises(ConfigError, match="method.name=rigl needs method.sparsity_end >= 1"):
        config("method.sparsity_end=0")
    with pytest.raises(ConfigError, match="method.rigl_grow=momentum ranks by the momentum"):
        config("method.rigl_grow=momentum")  # optim.momentum 0
    with pytest.raises(ConfigError, match="method.sparsity_init must be one of erk, uniform"):
        config("method.sparsity_init=random")
    with pytest.raises(ConfigError, match=r"method.sparsity_density must be in \(0, 1\)"):
        config("method.sparsity_density=1")


def test_the_scatter_rigl_config_loads():
    cfg = load_config(ROOT / "configs" / "cifar10_scatter_rigl_cpu_eps8.yaml")
    m = cfg.method
    assert (m.name, m.sparsity_density, m.sparsity_init, m.rigl_grow) == ("rigl", 0.2, "erk", "momentum")
    assert not cfg.model.weight_standardization and cfg.optim.momentum > 0
    # the test-time flip is how predictions are made, not the budget (the sparse rows were measured without it)
    dense = load_config(ROOT / "configs" / "cifar10_scatter_cpu_eps8.yaml", ["data.test_time_flip=false"])
    assert (cfg.privacy, cfg.train, cfg.data) == (dense.privacy, dense.train, dense.data)  # the same budget


def test_a_density_that_empties_a_layer_is_refused():
    """A layer with no active weight makes the network ignore its input: trained and charged for
    chance accuracy."""
    net = model()
    with pytest.raises(ConfigError, match=r"method.sparsity_density=0.001 with method.sparsity_init=uniform leaves no "
                                          r"active weight in 0.weight"):
        Masks.for_model(net, density=0.001, init="uniform")


def test_the_ema_starts_from_the_masked_model(tmp_path):
    """The averagers were built before the method: EMA copied the dense initial weights, which
    no iterate of a sparse run is (with ema_warmup=false they kept decay^T of its mass)."""
    run = train(tiny(tmp_path, "method.name=set", *SPARSE, "train.steps=10", "averaging.ema_warmup=false"),
                ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    saved = final_weights(run["run_dir"])
    ema = saved["averagers"]["ema"]["weights"]
    for key, mask in saved["method"]["masks"]["masks"].items():  # 0.999^10 of the EMA is its start
        # the masked start: only the weights SET dropped since (its smallest) lie outside, <= 0.15
        # of the mass here; the dense start put ~0.8 there
        outside = float(ema[key][~mask].abs().sum() / ema[key].abs().sum())
        assert outside < 0.4, (key, outside)
