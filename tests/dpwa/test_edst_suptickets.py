"""EDST (FreeTickets) and Sup-tickets under DP: tickets by schedule only, each within the density
budget, the EDST ensemble and the pruned Sup-tickets superposition in `dpwa eval` against a
direct computation, growth by the configured rule, one release per step (the DP-SGD charge),
and kill-and-resume."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn.utils import vector_to_parameters

import dpwa.train as train_module
from accounting import Ledger, sample_rate_and_steps
from dpwa.cli import main
from dpwa.config import ConfigError, load_config
from dpwa.evaluate import metrics
from dpwa.methods import METHODS, Step, make_method
from dpwa.run_folder import load_run
from dpwa.schedules import sgdr
from dpwa.sparsity import global_magnitude_masks
from dpwa.train import _check_length, train
from tests.conftest import ROOT, ledger_snapshot
from tests.dpwa.test_ensembles import counting_loader
from tests.dpwa.test_sparsity import model, releases
from tests.dpwa.test_train import final_weights, tiny

COMMON = ["method.sparsity_density=0.3", "method.sparsity_end=20", "method.sparsity_update_every=3",
          "method.sparsity_fraction=0.5", "privacy.epsilon=1", "train.steps=20", "optim.lr=2"]
EDST = ["method.name=edst", "method.edst_exploration=8", "method.edst_phases=3", "method.edst_phase_steps=4"]
SUP = ["method.name=suptickets", "method.suptickets_start=8", "method.suptickets_cycles=3",
       "method.suptickets_cycle_length=4"]


def config(*extra):
    return load_config(None, [*COMMON, *extra])


def run_steps(method, outs, lr=1.0):
    """Steps with the given releases; returns the diagnostics and counts the release calls."""
    calls, rows = [], []

    def release():
        calls.append(1)
        return outs[len(calls) - 1]

    for t in range(len(outs)):
        rows.append(method.step(Step(index=t, lr=lr, release=release)))
    assert len(calls) == len(outs)  # one release per step, jumps and tickets included: nothing else reads data
    return rows


def budget(masks):
    return round(0.3 * sum(m.numel() for m in masks.masks))


@pytest.mark.parametrize("extra, tickets, jumps, jump", [
    (EDST, [12, 16, 20], [12, 16], 0.8),
    (SUP, [8, 12, 16, 20], [8, 12, 16], 0.5),
    ([*SUP, "method.suptickets_from_start=false", "method.suptickets_jump=0"], [12, 16, 20], [], 0.0),
])
def test_tickets_are_collected_at_the_scheduled_steps_only(extra, tickets, jumps, jump):
    net = model()
    method = make_method(config(*extra), net)
    rows = run_steps(method, releases(net, 20))
    assert method.tickets.steps == tickets
    assert [r["tickets"] for r in rows] == [float(sum(t <= s for t in tickets)) for s in range(1, 21)]
    for s, r in enumerate(rows, start=1):
        if s in jumps:
            assert r["sparsity_drop_fraction"] == jump and r["sparsity_grown"] > 0
        elif s in tickets:  # a ticket is the trained weights: no routine update after it
            assert r["sparsity_drop_fraction"] == 0
        elif s % 3 == 0:
            assert 0 < r["sparsity_drop_fraction"] < 0.5  # the routine update, its cosine decay acting
        else:
            assert r["sparsity_drop_fraction"] == 0
    if "method.name=suptickets" in extra:
        assert method.superposition.count == len(tickets)


def test_every_ticket_meets_the_density_budget():
    for extra in (EDST, SUP):
        net = model()
        method = make_method(config(*extra, "optim.momentum=0.9", "method.tickets_grow=momentum"), net)
        run_steps(method, releases(net, 20))
        count = budget(method.masks)
        assert sum(method.masks.active) == count
        names = method.masks.names
        for member in method.tickets.members():
            weights = dict(member.named_parameters())
            assert sum(int((weights[n] != 0).sum()) for n in names) == count  # active weights are trained, nonzero


def test_the_phases_set_the_lr():
    net = model()
    rows = run_steps(make_method(config(*EDST, "method.edst_lr_fractions=[0.5,0.25]"), net), releases(net, 20), lr=3.0)
    # exploration: the schedule's lr (3 here); each 4-step phase: 0.5 x optim.lr for 2 steps, then 0.25 x
    assert [r["lr"] for r in rows] == [3.0] * 8 + [1.0, 1.0, 0.5, 0.5] * 3
    net = model()
    rows = run_steps(make_method(config(*SUP), net), releases(net, 20), lr=3.0)
    cosine = [sgdr(i, lr=0.1, min_lr=0.02, t0=4) for i in range(12)]  # 0.05 and 0.01 of optim.lr = 2
    assert [r["lr"] for r in rows] == [3.0] * 8 + cosine
    assert [r["lr"] for r in rows][11::4] == pytest.approx([0.02] * 3)  # each ticket at its cycle's lowest lr


def expected_growth(weights, old, scores, fraction):
    """Masks.update written out with topk: keep the n - k largest |w|, grow the k largest scores among the rest."""
    out = []
    for w, m, s in zip(weights, old, scores):
        n = int(m.sum())
        k = int(fraction * n)
        kept = torch.zeros(w.numel(), dtype=torch.bool)
        kept[torch.topk(torch.where(m.view(-1), w.abs().view(-1), torch.tensor(-1.0)), n - k).indices] = True
        kept[torch.topk(torch.where(kept, torch.tensor(-math.inf), s.abs().reshape(-1)), k).indices] = True
        out.append(kept.view_as(m))
    return out


@pytest.mark.parametrize("grow", ["random", "dense_noisy", "momentum"])
def test_re_exploration_grows_by_the_configured_rule(grow):
    """The reference regrows by gradient whatever --growth says; here the jump follows method.tickets_grow."""
    net = model()
    method = make_method(config(*SUP, "optim.momentum=0.5", f"method.tickets_grow={grow}",
                                "method.sparsity_end=1"), net)  # no routine updates: the jump at 8 is the first
    outs = releases(net, 8, seed=3)
    run_steps(method, outs[:7])
    public = torch.Generator()
    public.set_state(method.masks.generator.get_state())
    seen, update = [], method.masks.update

    def spy(fraction, scores, optimizer=None):
        seen.append(([p.detach().clone() for p in method.masks.params], [m.clone() for m in method.masks.masks],
                     [s.clone() for s in scores]))
        return update(fraction, scores, optimizer)

    method.masks.update = spy
    method.step(Step(index=7, lr=1.0, release=lambda: outs[7]))
    ((weights, old, scores),) = seen
    if grow == "random":  # SET: uniform scores from the masks' public generator
        assert all(torch.equal(s, torch.rand(p.shape, generator=public)) for s, p in zip(scores, method.masks.params))
    elif grow == "dense_noisy":  # |the jump step's own release|
        assert all(torch.equal(s, outs[7].grads[p].abs()) for s, p in zip(scores, method.masks.params))
    else:  # |m|, m <- 0.5 m + g over the 8 releases
        want = [sum(0.5 ** (7 - t) * outs[t].grads[p] for t in range(8)).abs() for p in method.masks.params]
        for s, w in zip(scores, want):
            torch.testing.assert_close(s, w)
    for a, b in zip(method.masks.masks, expected_growth(weights, old, scores, 0.5)):
        assert torch.equal(a, b)


def test_the_superposition_is_the_mean_of_the_tickets_pruned_to_the_budget_by_global_magnitude():
    net = model()
    method = make_method(config(*SUP), net)
    run_steps(method, releases(net, 20))
    vectors = torch.stack(method.tickets.vectors)
    assert len(vectors) == 4  # the step-8 iterate and 3 cycle tickets
    mean = vectors.mean(0)
    got = torch.cat([p.detach().reshape(-1) for p in method.superposition.params])
    torch.testing.assert_close(got, mean)
    pruned = dict(method.output().named_parameters())
    names, count = method.masks.names, budget(method.masks)
    average = dict(method.superposition.model.named_parameters())
    kept = torch.cat([(pruned[n] != 0).reshape(-1) for n in names])
    assert int(kept.sum()) == count  # exactly the budget's count
    union = torch.cat([average[n].detach().abs().reshape(-1) for n in names])
    assert int((union != 0).sum()) > count  # the tickets' masks differ: the mean is denser than the budget
    assert union[kept].min() >= union[~kept].max()  # the largest |w| over all masked layers together
    for n, p in pruned.items():
        if n in names:
            assert torch.equal(p[p != 0], average[n][p != 0])
        else:
            assert torch.equal(p, average[n])  # biases and GroupNorm as averaged
    ties = global_magnitude_masks([torch.ones(3), torch.ones(2, 2)], 4)  # ties: still exactly 4, by position
    assert [m.tolist() for m in ties] == [[True, True, True], [[True, False], [False, False]]]


SPARSE = ["model.weight_standardization=false", "optim.momentum=0.9", "method.sparsity_end=6",
          "method.sparsity_update_every=2", "method.tickets_grow=momentum"]
E2E = {"edst": ["method.name=edst", *SPARSE, "method.edst_exploration=6", "method.edst_phase_steps=2"],
       "suptickets": ["method.name=suptickets", *SPARSE, "method.suptickets_start=6",
                      "method.suptickets_cycle_length=2"]}
# Sup-tickets on GraNet's dense-to-sparse phase: dense masks pruned to the budget at steps 2, 4, 6
E2E["granet"] = [*E2E["suptickets"], "method.sparsity_init_density=1.0", "method.sparsity_prune_end=6"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A dense run and an EDST / a Sup-tickets run of the same 12 steps, counting reads of the training split."""
    tmp = tmp_path_factory.mktemp("tickets")
    out, splits = {}, []
    patch = pytest.MonkeyPatch()

    patch.setattr(train_module, "load_data", counting_loader(splits))
    try:
        for name, extra in (("dpsgd", SPARSE[:2]), *E2E.items()):
            led = tmp / f"{name}.sqlite"
            out[name] = train(tiny(tmp / name, *extra), ledger_path=str(led), progress=False)
            out[name]["spent"] = Ledger(str(led)).run(out[name]["run_id"]).spent
            out[name]["ledger"], out[name]["reads"] = led, splits[-1].reads
    finally:
        patch.undo()
    out["tmp"] = tmp
    return out


def test_ticket_runs_charge_what_dpsgd_charges_and_read_data_only_in_the_releases(runs):
    for name in ("edst", "suptickets", "granet"):
        assert runs[name]["releases"] == runs["dpsgd"]["releases"] == 12
        assert runs[name]["spent"] == runs["dpsgd"]["spent"] and runs[name]["epsilon"] == runs["dpsgd"]["epsilon"]
        # the same secret batches as the dense run, read the same way: by the releases, and nothing else
        assert runs[name]["reads"] == runs["dpsgd"]["reads"] > 0
        rows = [json.loads(line) for line in (Path(runs[name]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        before = [0.0] + [r["tickets"] for r in rows]
        assert [r["step"] for r, b in zip(rows, before) if r["tickets"] > b] == ([8, 10, 12] if name == "edst" else
                                                                                [6, 8, 10, 12])
    rows = [json.loads(line) for line in (Path(runs["granet"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "sparsity_pruned" in r] == [2, 4, 6]  # dense to the budget by the cycles
    densities = [r["sparsity_density"] for r in rows if "sparsity_density" in r]
    assert densities == sorted(densities, reverse=True) and densities[-1] == pytest.approx(0.2, abs=1e-3)
    rows = [json.loads(line) for line in (Path(runs["edst"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows][6:] == [0.2, 0.02] * 3  # the rows hold the lr applied: 0.1, 0.01 x optim.lr 2


def direct_probs(run, vectors, prune=None):
    """Mean softmax on the test split of the models with these parameter vectors, computed by hand."""
    names = [n for n, p in run.model.named_parameters() if p.requires_grad]
    x = run.data.normalize(run.data.test.x)
    total = 0
    for v in vectors:
        m = copy.deepcopy(run.model).eval()
        params = dict(m.named_parameters())
        with torch.no_grad():
            vector_to_parameters(v, [params[n] for n in names])
            if prune is not None:
                masked, count = prune
                flat = torch.cat([params[n].abs().reshape(-1) for n in masked])
                threshold = torch.topk(flat, count).values[-1]
                for n in masked:
                    params[n].masked_fill_(params[n].abs() < threshold, 0.0)
            total = total + m(x).softmax(1)
    return total / len(vectors)


def test_dpwa_eval_gives_the_tickets_ensemble_and_the_pruned_superposition_for_free(runs, capsys):
    for name in ("edst", "suptickets", "granet"):
        before = ledger_snapshot(runs[name]["ledger"])
        assert main(["eval", runs[name]["run_dir"], "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert ledger_snapshot(runs[name]["ledger"]) == before  # post-processing: no charge
        state = final_weights(runs[name]["run_dir"])["method"]
        vectors = list(state["tickets"]["vectors"])
        run = load_run(Path(runs[name]["run_dir"]))
        y = run.data.test.y
        got = result["methods"]["tickets"]
        assert got["members"] == len(vectors) == (3 if name == "edst" else 4)
        assert got == pytest.approx({**metrics(direct_probs(run, vectors), y), "members": len(vectors)}, rel=1e-5)
        assert "raw" in result["methods"]
        if name != "edst":
            masks = state["masks"]["masks"]
            count = sum(int(m.sum()) for m in masks.values())
            mean = torch.stack(vectors).mean(0)
            want = metrics(direct_probs(run, [mean], prune=(list(masks), count)), y)
            assert result["methods"]["suptickets"] == pytest.approx({**want, "members": 1}, rel=1e-5)
        else:
            assert "suptickets" not in result["methods"]
    assert main(["eval", runs["dpsgd"]["run_dir"], "--methods", "tickets"]) == 2
    assert "tickets: not kept by this run (needs method.name=edst or suptickets" in capsys.readouterr().err
    assert main(["eval", runs["dpsgd"]["run_dir"], "--json"]) == 0
    assert not {"tickets", "suptickets"} & set(json.loads(capsys.readouterr().out)["skipped"])


@pytest.mark.parametrize("name", ["edst", "suptickets", "granet"])
def test_masks_and_tickets_survive_kill_and_resume_with_one_charge(runs, name):
    tmp = runs["tmp"] / f"resume-{name}"
    led = str(tmp / "b.sqlite")
    stopped = train(tiny(tmp, *E2E[name]), ledger_path=led, progress=False, stop_after=10)
    assert final_weights(stopped["run_dir"])["step"] == 8  # after the ticket and the jump of step 8
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led, progress=False)
    a, b = final_weights(runs[name]["run_dir"]), final_weights(resumed["run_dir"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, mask in a["method"]["masks"]["masks"].items():
        assert torch.equal(mask, b["method"]["masks"]["masks"][key]), key
    assert a["method"]["tickets"]["steps"] == b["method"]["tickets"]["steps"]
    assert torch.equal(a["method"]["tickets"]["vectors"], b["method"]["tickets"]["vectors"])
    if name != "edst":
        for key, w in a["method"]["superposition"]["weights"].items():
            assert torch.equal(w, b["method"]["superposition"]["weights"][key]), key
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.spent == runs[name]["spent"]  # one charge, 12 releases


def test_ticket_fields_are_validated_and_belong_to_their_methods():
    with pytest.raises(ConfigError, match="method.edst_jump is for method.name=edst, not 'rigl'"):
        config("method.name=rigl", "method.edst_jump=0.5")
    with pytest.raises(ConfigError, match="method.suptickets_cycles is for method.name=suptickets, not 'edst'"):
        config(*EDST, "method.suptickets_cycles=4")
    with pytest.raises(ConfigError, match="method.tickets_grow is for method.name=edst / suptickets, not 'rigl'"):
        config("method.name=rigl", "method.tickets_grow=random")
    with pytest.raises(ConfigError, match="method.tickets_grow=momentum ranks by the momentum"):
        config(*EDST, "method.tickets_grow=momentum")  # optim.momentum 0
    with pytest.raises(ConfigError, match="method.name=edst needs method.edst_exploration >= 1"):
        config("method.name=edst")
    with pytest.raises(ConfigError, match="method.name=suptickets needs method.suptickets_start >= 1"):
        config(*SUP, "method.suptickets_cycle_length=1")
    with pytest.raises(ConfigError, match=r"method.edst_jump must be in \(0, 1\]"):
        config(*EDST, "method.edst_jump=0")
    with pytest.raises(ConfigError, match="the first must be >= the second"):
        config(*SUP, "method.suptickets_lr_fractions=[0.01,0.05]")
    with pytest.raises(ConfigError, match=r"ticket taken at the phase's lowest lr .* got \[0.1, 5.0\]"):
        config(*EDST, "method.edst_lr_fractions=[0.1,5]")
    with pytest.raises(ConfigError, match="train.steps must be method.edst_exploration .* = 20, got 21"):
        _check_length(config(*EDST), 21)
    with pytest.raises(ConfigError, match="optim.schedule=cyclic would put lr minima"):
        _check_length(config(*SUP, "optim.schedule=cyclic", "optim.cycle_length=4"), 20)
    assert METHODS["edst"].length_problems(config(*EDST), 20) == []


def test_granet_fields_are_validated():
    with pytest.raises(ConfigError, match=r"method.sparsity_init_density must be in \(method.sparsity_density, 1\]"):
        config(*SUP, "method.sparsity_init_density=0.3", "method.sparsity_prune_end=4")
    with pytest.raises(ConfigError, match="needs 0 <= method.sparsity_prune_start < method.sparsity_prune_end"):
        config(*SUP, "method.sparsity_init_density=1")
    with pytest.raises(ConfigError, match="schedule the pruning from method.sparsity_init_density, which is null"):
        config(*SUP, "method.sparsity_prune_end=4")
    with pytest.raises(ConfigError, match="method.sparsity_prune_end must be <= method.suptickets_start = 8; got 9"):
        config(*SUP, "method.sparsity_init_density=1", "method.sparsity_prune_end=9")
    with pytest.raises(ConfigError, match="method.sparsity_prune_end must be <= method.edst_exploration = 8; got 9"):
        config(*EDST, "method.sparsity_init_density=1", "method.sparsity_prune_end=9")
    with pytest.raises(ConfigError, match="method.sparsity_init_density is for method.name=set"):
        load_config(None, ["method.sparsity_init_density=1", "privacy.epsilon=1", "train.steps=2"])


def test_refused_layouts_cost_nothing(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    args = ["train", str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "--ledger", str(led),
            f"out_dir={tmp_path / 'runs'}", *E2E["edst"], "train.steps=13"]
    assert main(args) == 2
    assert "train.steps must be" in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["edst", "suptickets"])
def test_the_scatter_ticket_configs_load_with_the_dense_budget(name):
    cfg = load_config(ROOT / "configs" / f"cifar10_scatter_{name}_cpu_eps8.yaml")
    # the test-time flip is how predictions are made, not the budget (the sparse rows were measured without it)
    dense = load_config(ROOT / "configs" / "cifar10_scatter_cpu_eps8.yaml", ["data.test_time_flip=false"])
    assert (cfg.privacy, cfg.train, cfg.data) == (dense.privacy, dense.train, dense.data)  # the same budget
    assert cfg.method.name == name and cfg.method.sparsity_density == 0.2 and not cfg.model.weight_standardization
    _, steps = sample_rate_and_steps(batch_size=cfg.train.batch_size, dataset_size=50_000, epochs=cfg.train.epochs)
    assert METHODS[name].releases(cfg, steps) == steps == 367  # the run ends at its last ticket
