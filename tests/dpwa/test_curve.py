"""Mode-connecting curves under DP (method.name=curve, `dpwa curve`; Garipov et al. 2018): the
curve's geometry, the chain-rule step on one release, resume, the ledger, the free evaluation
and the refusals. Endpoints are two tiny digits runs, trained once for the module."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from accounting import Ledger, PoissonGaussian, epsilon
from dpwa.cli import main
from dpwa.config import ConfigError, load_config
from dpwa.connectivity import curve_config, plane, plane_grid
from dpwa.data import Split, load_data
from dpwa.engines import make_engine
from dpwa.mechanism import GradientMechanism, Release
from dpwa.methods import METHODS, Step, make_method
from dpwa.methods.curve import bezier, combine, polychain
from dpwa.models.from_config import build_model
from dpwa.train import train
from tests.conftest import ledger_snapshot
from tests.dpwa.test_train import final_weights, tiny


@pytest.fixture(scope="module")
def ends(tmp_path_factory):
    """Two independent private runs on digits (seeds 0 and 1), charged to one ledger."""
    root = tmp_path_factory.mktemp("endpoints")
    led = str(root / "ledger.sqlite")
    dirs = [Path(train(tiny(root / f"s{s}", f"train.seed={s}"), ledger_path=led, progress=False)["run_dir"])
            for s in (0, 1)]
    return dirs[0], dirs[1], led


def _random_points(k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(3, 2, generator=g), torch.randn(4, generator=g)] for _ in range(k)]


def test_bezier_and_polychain_pass_through_their_points():
    w1, theta, w2 = pts = _random_points(3)
    for t, want in ((0.0, w1), (0.5, [(a + 2 * b + c) / 4 for a, b, c in zip(w1, theta, w2)]), (1.0, w2)):
        for got, x in zip(combine(pts, bezier(t, 3)), want):
            torch.testing.assert_close(got, x)
    chain = _random_points(4, seed=1)  # PolyChain with 2 bends: nodes at t = 0, 1/3, 2/3, 1
    for j, node in enumerate(chain):
        for got, x in zip(combine(chain, polychain(j / 3, 4)), node):
            torch.testing.assert_close(got, x)
    for got, a, b in zip(combine(chain, polychain(0.5, 4)), chain[1], chain[2]):  # halfway along a link
        torch.testing.assert_close(got, (a + b) / 2)
    for t in (0.0, 0.13, 0.5, 0.77, 1.0):  # both are partitions of unity: the segment reproduces itself
        assert sum(bezier(t, 5)) == pytest.approx(1) and sum(polychain(t, 5)) == pytest.approx(1)


def _curve(ends, *extra, steps=6):
    a, b, _ = ends
    return curve_config(a, b, overrides=[f"train.steps={steps}", *extra])


def test_the_chain_rule_step_equals_per_example_gradients_of_the_curve_model(ends):
    """One step at noise 0 against torch.func on the curve model theta -> L(w(t; theta)). The
    clip is the mechanism's, at w(t): each example's gradient g_i at w(t) is clipped by
    min(1, C / (|g_i| + 1e-6)) with |g_i| its norm at w(t) (not its norm in bend space, which
    is b_1(t) |g_i|), and then mapped to the bend by b_1(t); weight decay wd b_1(t) w(t) after."""
    cfg = _curve(ends, "optim.weight_decay=0.1", "privacy.clip_norm=0.5")
    data = load_data(cfg.data)
    model = build_model(cfg, data, load_pretrained=False)
    method = make_method(cfg, model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    batch = 16  # the expected batch size the release divides by
    mechanism = GradientMechanism(model, engine=make_engine("dpwa-fast", model), clip_norm=0.5, noise_multiplier=0.0,
                                  expected_batch_size=batch, sample_rate=0.1, releases=1)
    x, y = data.normalize(data.test.x[:12]), data.test.y[:12]
    a, bend, b = ([t.detach().clone() for t in point] for point in method.points)
    stats = method.step(Step(index=0, lr=1.0, release=lambda: mechanism.release([(x.unsqueeze(1), y)])))
    got = [before - after.detach() for before, after in zip(bend, method.points[1])]  # sgd, lr 1: the gradient

    c = bezier(stats["curve_t"], 3)
    w_t = [c[0] * u + c[1] * th + c[2] * v for u, th, v in zip(a, bend, b)]

    def loss_at(weights, xi, yi):
        return F.cross_entropy(functional_call(model, dict(zip(names, weights)), (xi[None],)), yi[None])

    def loss_of_bend(theta, xi, yi):  # the curve model: the bend is the only input
        return loss_at([c[0] * u + c[1] * th + c[2] * v for u, th, v in zip(a, theta, b)], xi, yi)

    per_bend = vmap(grad(loss_of_bend), in_dims=(None, 0, 0))(bend, x, y)
    per_w = vmap(grad(loss_at), in_dims=(None, 0, 0))(w_t, x, y)
    for gb, gw in zip(per_bend, per_w):  # the chain rule, example by example
        torch.testing.assert_close(gb, c[1] * gw, rtol=1e-5, atol=1e-7)
    norms = torch.sqrt(sum(g.flatten(1).square().sum(1) for g in per_w))  # at w(t)
    factors = (0.5 / (norms + 1e-6)).clamp(max=1.0)
    assert (factors < 1).any()  # the clip binds for some examples
    want = [torch.einsum("b,b...->...", factors, g) / batch + 0.1 * c[1] * w for g, w in zip(per_bend, w_t)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    for fixed, point in ((a, method.points[0]), (b, method.points[2])):  # the endpoints do not move
        assert all(torch.equal(u, v) for u, v in zip(fixed, point))
    mid = combine(method.points, bezier(0.5, 3))  # between steps the model holds w(1/2)
    assert all(torch.equal(p.detach(), m) for p, m in zip(method.params, mid))


def test_the_state_holds_the_bends_and_the_t_generator(ends):
    cfg = _curve(ends, "method.curve_type=polychain", "method.curve_bends=2", "optim.momentum=0.9")
    data = load_data(cfg.data)
    model = build_model(cfg, data, load_pretrained=False)
    method = make_method(cfg, model)
    a, b = method.points[0], method.points[-1]
    for j in (1, 2):  # bends start on the segment
        for theta, u, v in zip(method.points[j], a, b):
            torch.testing.assert_close(theta, u + (v - u) * j / 3)

    def release():  # a gradient that depends on where it is taken
        return Release({p: p.detach().sin() for p in method.params}, 0.0, 0)

    method.step(Step(index=0, lr=0.1, release=release))
    state = copy.deepcopy(method.state_dict())  # as written to a checkpoint (the optimizer's holds its buffers)
    after = [method.step(Step(index=1, lr=0.1, release=release))["curve_t"], method.state_dict()["points"]]
    fresh = make_method(cfg, build_model(cfg, data, load_pretrained=False))
    fresh.load_state_dict(state)
    again = [fresh.step(Step(index=1, lr=0.1, release=lambda: Release(
        {p: p.detach().sin() for p in fresh.params}, 0.0, 0)))["curve_t"], fresh.state_dict()["points"]]
    assert again[0] == after[0]  # the same public t
    for x, y in zip(sum(after[1], []), sum(again[1], [])):
        assert torch.equal(x, y)


def test_the_curve_run_is_one_reservation_under_the_endpoints_dataset_and_its_evaluation_is_free(ends, capsys):
    a, b, led = ends
    before = {r.run_id for r in Ledger(led).runs()}
    code = main(["curve", str(a), str(b), "train.steps=6", "--no-progress", "--plane-points", "5", "--points", "5"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "two independent runs" in out.out and "barrier" in out.out
    (run,) = [r for r in Ledger(led).runs() if r.run_id not in before]  # one reservation, committed once
    run_dir = a.parent / run.run_id  # out_dir is endpoint A's
    meta = json.loads((run_dir / "run.json").read_text())
    event = PoissonGaussian(noise_multiplier=meta["noise_multiplier"], sample_rate=64 / 1497, steps=6)
    assert run.status == "committed" and run.dataset == "digits" and meta["method"] == "curve"
    assert list(run.planned) == list(run.spent) == [event]
    assert meta["sample_rate"] == pytest.approx(64 / 1497) and meta["releases"] == 6
    runs = Ledger(led).runs()
    assert {json.loads((d / "run.json").read_text())["run_id"] for d in (a, b)} <= {r.run_id for r in runs}
    assert Ledger(led).spent("digits", delta=1e-4) == pytest.approx(  # the curve composes with its endpoints
        epsilon([e for r in runs for e in r.spent], delta=1e-4))

    ev = json.loads((run_dir / "curve_eval.json").read_text())
    assert ev["t"] == [0.0, 0.25, 0.5, 0.75, 1.0] and ev["charged"].startswith("nothing")
    assert ev["curve"][0] == ev["segment"][0] and ev["curve"][-1] == ev["segment"][-1]  # shared endpoints
    for name in ("curve", "segment"):  # the barrier: the largest excess over the endpoints' interpolation
        e = [r["error"] for r in ev[name]]
        excess = max(v - ((1 - t) * e[0] + t * e[-1]) for t, v in zip(ev["t"], e))
        assert ev["barrier"][name]["error"] == pytest.approx(excess)
    assert set(ev["ensembles"]) == {"endpoints", "curve", "segment"}
    p = ev["plane"]
    for x, y in p["points"].values():  # the grid covers its three points ...
        assert min(p["x"]) <= x <= max(p["x"]) and min(p["y"]) <= y <= max(p["y"])
    assert p["distance_to_plane"]["curve"] < 1e-5 * p["distance_w1_w2"]  # ... and the 1-bend curve lies in it
    assert all((run_dir / f).is_file() for f in ("curve_error.png", "curve_plane.png"))
    snapshot = ledger_snapshot(led)
    for verb in (["eval"], ["landscape", "--dims", "1", "--points", "3"], ["curvature", "--iterations", "2"],
                 ["landscape", "--split", "train", "--train-noise-multiplier", "5", "--loss-clip", "2"],
                 ["landscape", "--dims", "1", "--points", "3", "--to", str(a)]):
        # a curve is not one model: refused, pointed to dpwa curve --eval (a charged split before its reservation)
        centre, rest = (a, [*verb[1:-1], str(run_dir)]) if "--to" in verb else (run_dir, verb[1:])  # or its target
        assert main([verb[0], str(centre), *rest]) == 2, verb
        assert "is a curve run" in capsys.readouterr().err and ledger_snapshot(led) == snapshot
    assert main(["curve", "--eval", str(run_dir), "--plane-examples", "-5"]) == 2
    assert "--plane-examples must be >= 1 (0 on the command line: all), got -5" in capsys.readouterr().err
    assert main(["curve", "--eval", str(run_dir), "--points", "3", "--plane-points", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["t"] == [0.0, 0.25, 0.5, 0.75, 1.0]  # the ensemble's t are evaluated
    assert main(["curve", "--eval", str(a)]) == 2 and "not a curve run" in capsys.readouterr().err
    assert ledger_snapshot(led) == snapshot


def test_a_killed_curve_run_resumes_where_an_uninterrupted_one_ends(ends, tmp_path):
    cfg = _curve(ends, f"out_dir={tmp_path}", "optim.momentum=0.5", steps=8)
    full = train(cfg, ledger_path=ends[2], progress=False)
    stopped = train(cfg, ledger_path=ends[2], progress=False, stop_after=6)  # resumes from step 4
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=ends[2], progress=False)
    x, y = final_weights(full["run_dir"])["method"], final_weights(resumed["run_dir"])["method"]
    for u, v in zip(sum(x["points"], []), sum(y["points"], [])):
        assert torch.equal(u, v)
    assert torch.equal(x["t_generator"], y["t_generator"])
    assert Ledger(ends[2]).run(resumed["run_id"]).spent == Ledger(ends[2]).run(full["run_id"]).spent


def test_a_curve_through_dpwa_train_needs_its_endpoints_ledger_and_is_private_only_if_they_are(ends, tmp_path):
    """`dpwa train` with method.name=curve (not only `dpwa curve`) refuses a ledger that does
    not hold the endpoint runs, whose weights the curve's checkpoints carry, before reserving;
    endpoints trained with a test noise seed are not private, and neither is the curve."""
    from dpwa.errors import UsageError

    fresh = tmp_path / "fresh.sqlite"
    with pytest.raises(UsageError, match=r"built on released run .* \(a curve endpoint, or model.pretrained\): "
                                         r"its run .* is not in ledger"):
        train(_curve(ends, f"out_dir={tmp_path / 'runs'}", steps=2), ledger_path=str(fresh), progress=False)
    assert not fresh.exists() and not (tmp_path / "runs").exists()  # refused before the ledger is made
    report = train(_curve(ends, f"out_dir={tmp_path / 'runs'}", "privacy.noise_seed=null", steps=2),
                   ledger_path=ends[2], progress=False)
    assert [json.loads((d / "run.json").read_text())["private"] for d in ends[:2]] == [False, False]
    assert report["private"] is False and json.loads((Path(report["run_dir"]) / "run.json").read_text())["private"] is False


def _edited_copy(src, dst, config=None, meta=None):
    shutil.copytree(src, dst)
    if config:
        text = (dst / "config.yaml").read_text()
        for old, new in config:
            assert old in text
            text = text.replace(old, new, 1)
        (dst / "config.yaml").write_text(text)
    if meta:
        (dst / "run.json").write_text(json.dumps({**json.loads((dst / "run.json").read_text()), **meta}))
    return dst


def test_endpoints_from_before_data_val_seed_connect_when_no_split_was_carved(ends, tmp_path):
    """Run folders from before data.val_seed read their train.seed as the carve's seed only if
    they carved a split; with none, seeds 0 and 1 (or an old permutation carve) choose nothing,
    and the curve accepts them. With a split, endpoints carved by other seeds are refused."""
    from dpwa.methods.curve import check_endpoints

    a, b, _ = ends
    old = [_edited_copy(end, tmp_path / name, config=[("  val_seed: 0\n", ""), ("val_carve: stable", "val_carve: "
                                                                                 "permutation")])
           for end, name in ((a, "a"), (b, "b"))]
    assert [e.cfg.data.val_seed for e in check_endpoints(curve_config(*old, overrides=["train.steps=2"]))] == [0, 0]
    carved = [_edited_copy(end, tmp_path / f"{name}-carved", config=[("  val_seed: 0\n", ""), ("val_size: 0",
                                                                                               "val_size: 50")])
              for end, name in ((a, "a"), (b, "b"))]
    with pytest.raises(ConfigError, match=r"its data config differs from the curve's \(val_seed: 0 vs 1\)"):
        check_endpoints(curve_config(*carved, overrides=["train.steps=2", "data.val_size=50"]))


@pytest.mark.parametrize("case, expect", [
    ("model", "its model config differs from the curve's (groups: 8 vs 4)"),
    ("dataset", "was trained on dataset 'cifar10'"),
    ("curve", "is a curve run"),
    ("same", "the curve's endpoints are one model"),
    ("ledger", "is not in ledger"),
])
def test_mismatched_endpoints_are_refused_before_anything_is_charged(ends, tmp_path, capsys, case, expect):
    a, b, led = ends
    args = []
    if case == "model":
        b = _edited_copy(b, tmp_path / "b", config=[("groups: 8", "groups: 4")])
    elif case == "dataset":
        b = _edited_copy(b, tmp_path / "b", config=[("name: digits", "name: cifar10")], meta={"dataset": "cifar10"})
    elif case == "curve":
        b = _edited_copy(b, tmp_path / "b", config=[("name: dpsgd", "name: curve"), ("curve_endpoints: []",
                                                                                     "curve_endpoints: [x, y]")])
    elif case == "same":
        b = a
    else:
        args = ["--ledger", str(tmp_path / "other.sqlite")]
    snapshot = ledger_snapshot(led)
    assert main(["curve", str(a), str(b), "train.steps=2", "--no-progress", *args]) == 2
    assert expect in capsys.readouterr().err
    assert ledger_snapshot(led) == snapshot and not (tmp_path / "other.sqlite").exists()


def test_bad_evaluation_arguments_are_refused_before_the_curve_is_charged(ends, capsys):
    a, b, led = ends
    snapshot = ledger_snapshot(led)
    for args, needle in ((["--points", "0"], "points=0"), (["--plane-points", "1"], "plane_points=1"),
                         (["--plane-examples", "-4"], "--plane-examples must be >= 1")):
        assert main(["curve", str(a), str(b), "train.steps=2", "--no-progress", *args]) == 2
        assert needle in capsys.readouterr().err and ledger_snapshot(led) == snapshot
    # overrides may follow --endpoint-model, as the synopsis orders them
    assert main(["curve", str(a), str(a), "--endpoint-model", "raw", "ema", "train.steps=3", "--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["endpoint_models"] == ["raw", "ema"] and ledger_snapshot(led) == snapshot
    with pytest.raises(SystemExit):
        main(["curve", str(a), str(b), "--endpoint-model", "fge"])
    assert "choose one or two of raw, ema, polyak, swa; got ['fge']" in capsys.readouterr().err


def test_the_plane_holds_its_three_points_and_a_one_bend_curve_exactly():
    g = torch.Generator().manual_seed(3)
    w1, theta, w2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(3))
    pl = plane(w1, w2, theta)
    assert pl.coordinates(w1) == (0.0, 0.0)
    x2, y2 = pl.coordinates(w2)
    assert x2 == pytest.approx(float((w2 - w1).norm())) and abs(y2) < 1e-12
    assert float(pl.u @ pl.v) == pytest.approx(0, abs=1e-12) and float(pl.v.norm()) == pytest.approx(1)
    for w in (w1, w2, theta):
        torch.testing.assert_close(pl.point(*pl.coordinates(w)), w)
    for t in (0.1, 0.5, 0.9):  # an affine combination of the three points lies in their plane
        w = sum(c * p for c, p in zip(bezier(t, 3), (w1, theta, w2)))
        assert pl.residual(w) < 1e-10
    longer = sum(c * p for c, p in zip(bezier(0.5, 4), (w1, theta, torch.randn(50, generator=g, dtype=torch.float64), w2)))
    assert pl.residual(longer) > 1e-3  # a 2-bend curve leaves the plane: drawn as its projection

    class Flat:  # an evaluator stub: test error = distance from w1 (no model needed)
        def probs(self, w, split):
            return w

        def row(self, w, probs, split):
            return {"error": float((w.double() - w1).norm()), "nll": 0.0}

    split = Split(torch.zeros(3, 1, 1, 1), torch.zeros(3, dtype=torch.long))
    grid = plane_grid(Flat(), split, w1.float(), w2.float(), theta.float(), grid=7, margin=0.1)
    xs, ys = grid["x"], grid["y"]
    assert len(xs) == len(ys) == 7 and len(grid["error"]) == 7
    for x, y in grid["points"].values():
        assert xs[0] < x < xs[-1] and ys[0] < y < ys[-1]
    assert grid["error"][0][0] == pytest.approx(math.hypot(xs[0], ys[0]), rel=1e-5)


def test_curve_fields_belong_to_curve_and_are_checked():
    assert METHODS["curve"].releases(None, 17) == 17  # one release per step
    with pytest.raises(ConfigError, match="method.curve_bends is for method.name=curve, not 'dpsgd'"):
        load_config(None, ["method.curve_bends=2", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match=r"needs method.curve_endpoints=\[RUN_DIR_A, RUN_DIR_B\]"):
        load_config(None, ["method.name=curve", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.curve_type must be one of bezier, polychain"):
        load_config(None, ["method.name=curve", "method.curve_type=spline", "method.curve_endpoints=[a,b]",
                           "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ConfigError, match="method.curve_endpoint_models must be two of raw, ema, polyak, swa"):
        load_config(None, ["method.name=curve", "method.curve_endpoints=[a,b]", "method.curve_endpoint_models=[fge,raw]",
                           "privacy.epsilon=1", "train.steps=2"])
