"""`dpwa landscape` (Li et al. 2018): filter normalisation by role, the grid against a closed
form, the free test surfaces of a finished run, and the train-split surface as a charged query
(refused without a budget; with one: one reservation, one Gaussian event, committed, values
equal to a slow float64 reference up to the replayed noise)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from accounting import Gaussian, Ledger
from dpwa.cli import main
from dpwa.landscape import (CENTRED, FILTER, ZERO, Grid, LandscapeError, LandscapeSpec, landscape_run, parameter_roles,
                            pca_directions, private_subset, random_direction, state_of, subset_indices, surface)
from dpwa.models.standardize import Standardize
from dpwa.models.ws import WSConv2d
from tests.conftest import ledger_snapshot


class GainConv(nn.Conv2d):
    """A conv with a per-channel gain shaped (C, 1, 1, 1), like NF nets' scaled WS convs."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(cin, cout, 3, padding=1)
        self.gain = nn.Parameter(torch.rand(cout, 1, 1, 1) + 0.5)

    def forward(self, x):
        return F.conv2d(x, self.weight * self.gain, self.bias, padding=1)


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(Standardize(3), WSConv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(),
                        GainConv(4, 5), nn.Flatten(), nn.Linear(5 * 16, 3), nn.Linear(3, 2))
    with torch.no_grad():
        net[1].weight.add_(0.3)  # filters with a clear mean: centring matters
    net[7].weight.requires_grad_(False)  # frozen: not trained, not moved
    return net


def test_filter_normalisation_by_role_not_by_dimension():
    net = _net()
    roles = parameter_roles(net)
    assert roles == {"1.weight": CENTRED, "1.bias": ZERO, "2.weight": ZERO, "2.bias": ZERO, "4.weight": FILTER,
                     "4.bias": ZERO, "4.gain": ZERO, "6.weight": FILTER, "6.bias": ZERO, "7.weight": ZERO,
                     "7.bias": ZERO, "0.mean": ZERO, "0.var": ZERO}  # the (5,1,1,1) gain is not a filter
    d = random_direction(net, torch.Generator().manual_seed(3))
    w = state_of(net)
    for k in ("4.weight", "6.weight"):
        torch.testing.assert_close(d[k].flatten(1).norm(dim=1), w[k].flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    ws, wd = w["1.weight"].flatten(1), d["1.weight"].flatten(1)
    torch.testing.assert_close(wd.mean(1), torch.zeros(4), atol=1e-6, rtol=0)  # centred per filter
    torch.testing.assert_close(wd.norm(dim=1), (ws - ws.mean(1, keepdim=True)).norm(dim=1), rtol=1e-5, atol=0)
    assert wd.norm(dim=1).max() < ws.norm(dim=1).min()  # not the raw norm, which includes the mean
    assert all(not d[k].any() for k, role in roles.items() if role == ZERO)
    again = random_direction(net, torch.Generator().manual_seed(3))
    assert all(torch.equal(d[k], again[k]) for k in d)  # seeded: reproducible


def test_timm_scaled_ws_conv_gain_is_zeroed():
    std_conv = pytest.importorskip("timm.layers.std_conv")
    conv = std_conv.ScaledStdConv2d(3, 4, 3)
    assert parameter_roles(conv) == {"weight": CENTRED, "bias": ZERO, "gain": ZERO}


def test_2d_surface_of_a_quadratic_matches_the_closed_form():
    """f(W) = 1/2 sum S (W - C)^2 on a non-square, off-centre grid: values[i, j] is f at (xs[i], ys[j])."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    s, c = torch.rand(3, 4, dtype=torch.float64) + 0.1, torch.randn(3, 4, dtype=torch.float64)

    def measure(m, coords):
        return {"loss": float(0.5 * (s * (m.weight - c) ** 2).sum() + (m.bias ** 2).sum())}

    g = torch.Generator().manual_seed(0)
    origin = state_of(model)
    dx, dy = random_direction(model, g), random_direction(model, g)
    grid = Grid.linspace((-1.0, 2.0), 7, (-0.5, 0.25), 4)
    values = surface(model, origin, [dx, dy], grid, measure)["loss"]
    assert values.shape == (7, 4)
    u, x, y = origin["weight"] - c, dx["weight"], dy["weight"]
    const = float(0.5 * (s * u * u).sum() + (origin["bias"] ** 2).sum())  # the bias does not move (zeroed)
    gx, gy = float((s * u * x).sum()), float((s * u * y).sum())
    hxx, hxy, hyy = float((s * x * x).sum()), float((s * x * y).sum()), float((s * y * y).sum())
    a, b = np.meshgrid(grid.xs, grid.ys, indexing="ij")
    expected = const + a * gx + b * gy + 0.5 * (a * a * hxx + 2 * a * b * hxy + b * b * hyy)
    np.testing.assert_allclose(values, expected, rtol=1e-12)
    torch.testing.assert_close(model.weight.detach(), origin["weight"])  # left at the origin


def test_pca_recovers_the_plane_of_the_trajectory():
    like = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    e1, e2 = torch.zeros(6), torch.zeros(6)
    e1[0], e2[4] = 1.0, 1.0
    t = torch.linspace(-1, 1, 9)
    rows = 5.0 + 3 * t[:, None] * e1 + 0.5 * (t ** 2)[:, None] * e2
    dirs, ratios, coords = pca_directions(rows, ["a"], like, 2)
    assert abs(float(dirs[0]["a"].flatten() @ e1)) == pytest.approx(1.0)
    assert abs(float(dirs[1]["a"].flatten() @ e2)) == pytest.approx(1.0)
    assert ratios[0] > ratios[1] > 0 and not dirs[0]["b"].any() and coords.shape == (9, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny private quickstart runs of the same model; the second keeps a trajectory (FGE
    snapshots at steps 2, 6 and 10 of a cyclic schedule, and SWAG deviations)."""
    from dpwa.train import train
    from tests.dpwa.test_train import tiny

    tmp = tmp_path_factory.mktemp("landscape")
    ledger = str(tmp / "l.sqlite")
    first = train(tiny(tmp), ledger_path=ledger, progress=False)["run_dir"]
    second = train(tiny(tmp, "train.seed=1", "train.steps=10", "optim.schedule=cyclic", "optim.warmup_steps=0",
                        "optim.cycle_length=4", "optim.min_lr=0.2", "averaging.snapshots=true", "averaging.swag=true",
                        "averaging.swa_every=2", "averaging.swag_rank=4"),
                   ledger_path=ledger, progress=False)["run_dir"]
    return Path(first), Path(second), Path(ledger)


def _evaluate(run_dir, method):
    from dpwa.evaluate import evaluate
    from dpwa.run_folder import load_run

    run = load_run(run_dir)
    return evaluate(next(iter(run.prediction_methods()[method]())), run.data.test, run.data)


def test_between_and_to_pass_through_both_weight_vectors(runs, tmp_path):
    first, second, _ = runs
    r = landscape_run(first, LandscapeSpec(dims=1, between=("raw", "ema"), x_range=(-1.0, 1.0), points=(3,)),
                      out=tmp_path)
    assert r["grid"]["x"] == [-1.0, 0.0, 1.0] and r["charged"] is False
    for i, method in ((1, "raw"), (2, "ema")):
        m = _evaluate(first, method)
        assert r["values"]["accuracy"][i] == pytest.approx(m["accuracy"])
        assert r["values"]["loss"][i] == pytest.approx(m["nll"], rel=1e-5)
    r = landscape_run(first, LandscapeSpec(dims=1, to=str(second), x_range=(0.0, 1.0), points=(2,)), out=tmp_path)
    with pytest.raises(LandscapeError, match=r"the direction raw: this run -> .* is zero: both ends are the same"):
        landscape_run(first, LandscapeSpec(dims=1, to=str(first), points=(2,)), out=tmp_path)
    assert r["values"]["loss"][1] == pytest.approx(_evaluate(second, "raw")["nll"], rel=1e-5)
    pca = landscape_run(second, LandscapeSpec(dims=2, pca=True, points=(3, 2)), out=tmp_path)
    assert pca["trajectory"].startswith("3 FGE snapshots") and len(pca["explained_variance_ratio"]) == 2
    first_snapshot, _, last_snapshot = pca["trajectory_coordinates"]  # the last is the last iterate: the centre
    assert last_snapshot == pytest.approx([0.0, 0.0], abs=1e-4) and max(map(abs, first_snapshot)) > 0.1
    (xlo, xhi), (ylo, yhi) = (pca["grid"][a][::len(pca["grid"][a]) - 1] for a in "xy")  # covers the trajectory
    assert all(xlo < c[0] < xhi and ylo < c[1] < yhi for c in pca["trajectory_coordinates"])


def test_cli_end_to_end_writes_pictures_and_numbers(runs, tmp_path, capsys):
    first, _, _ = runs
    assert main(["landscape", str(first), "--points", "4", "3", "--examples", "60", "--seed", "5", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert "charges nothing" in capsys.readouterr().out
    for name in ("random-2d-test-contour.png", "random-2d-test-surface.png"):
        assert (tmp_path / name).stat().st_size > 0
    z = np.load(tmp_path / "random-2d-test.npz")
    assert z["loss"].shape == (4, 3) and z["accuracy"].shape == (4, 3) and len(z["y"]) == 3
    meta = json.loads(str(z["meta"]))
    assert meta["seed"] == 5 and meta["split"] == "test" and meta["examples"] == 60 and meta["charged"] is False
    from safetensors import safe_open

    with safe_open(tmp_path / "random-2d-test-directions.safetensors", "pt") as f:
        assert f.metadata()["seed"] == "5" and {k.split("/")[0] for k in f.keys()} == {"x", "y"}
    assert main(["landscape", str(first), "--dims", "1", "--points", "5", "--examples", "60", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    assert (tmp_path / "random-1d-test.png").stat().st_size > 0


def test_pca_without_a_trajectory_is_refused(runs, capsys):
    assert main(["landscape", str(runs[0]), "--pca", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "keeps no trajectory" in err and "averaging.snapshots" in err and "averaging.swag" in err


@pytest.mark.parametrize("split", ["train", "val"])
def test_private_split_without_a_budget_is_refused_before_anything_is_read(runs, monkeypatch, capsys, split):
    import dpwa.data
    import dpwa.run_folder

    def read(*a, **k):
        raise AssertionError("data was read")

    first, _, ledger = runs
    before = ledger_snapshot(ledger)
    monkeypatch.setattr(dpwa.data, "load_data", read)
    monkeypatch.setattr(dpwa.run_folder, "load_run", read)
    assert main(["landscape", str(first), "--split", split]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "private" in err and "--train-noise-multiplier" in err
    assert ledger_snapshot(ledger) == before


def test_a_query_past_the_budget_is_refused_before_the_reservation(runs, tmp_path, capsys):
    import sqlite3

    ledger = tmp_path / "tight.sqlite"  # the runs' ledger, with a budget just above their spend
    with sqlite3.connect(runs[2]) as src, sqlite3.connect(ledger) as dst:
        src.backup(dst)
    Ledger(ledger).set_budget("digits", epsilon=Ledger(ledger).spent("digits", delta=1e-4) + 0.05, delta=1e-4)
    before = ledger_snapshot(ledger)
    assert main(["landscape", str(runs[0]), "--split", "train", "--train-noise-multiplier", "1", "--loss-clip", "2",
                 "--points", "3", "--ledger", str(ledger), "--no-progress"]) == 1
    assert "past its budget" in capsys.readouterr().err and ledger_snapshot(ledger) == before


def test_a_query_charged_to_a_ledger_without_the_run_is_refused(runs, tmp_path, capsys):
    """A fresh --ledger has no budget and none of the run's spend: a query there would be admitted
    and the dataset's real ledger never see it."""
    first, _, ledger = runs
    before = ledger_snapshot(ledger)
    other = tmp_path / "fresh.sqlite"
    assert main(["landscape", str(first), "--split", "train", "--train-noise-multiplier", "1", "--loss-clip", "2",
                 "--points", "3", "--ledger", str(other), "--no-progress", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not in ledger" in err and str(other) in err
    assert ledger_snapshot(ledger) == before and not other.exists() and not (tmp_path / "out").exists()


def test_a_non_finite_loss_counts_as_the_clip():
    """clamp keeps NaN: one example's NaN loss made the noisy sum NaN, telling it was in the data."""
    from dpwa.loss_query import LossMechanism

    def mech():
        return LossMechanism(noise_multiplier=1.0, loss_clip=2.0, dataset_size=4, releases=1,
                             generator=torch.Generator().manual_seed(0))

    losses = torch.tensor([0.5, float("nan"), float("inf"), -float("inf")])
    assert mech().release([losses]) == pytest.approx(mech().release([torch.tensor([0.5, 2.0, 2.0, 0.0])]), abs=0)


def test_a_private_subset_on_neighbouring_data_is_a_neighbour():
    """One example inserted moves the subset by at most one example in and one out (the mean
    loss's sensitivity B / n holds); a seeded permutation of positions moves most of it."""
    from dpwa.config import DataConfig
    from dpwa.data import Split, _example_keys, load_data

    whole = load_data(DataConfig(name="digits")).train
    at = 300
    plus = Split(torch.cat([whole.x[:at], whole.x[:1].flip(-1), whole.x[at:]]),
                 torch.cat([whole.y[:at], whole.y[:1], whole.y[at:]]))

    def chosen(split, idx):
        keys = _example_keys(split)
        return {keys[i] for i in idx.tolist()}

    for seed in range(5):
        a, b = chosen(whole, private_subset(whole, 200, seed)), chosen(plus, private_subset(plus, 200, seed))
        assert len(a) == len(b) == 200 and len(a ^ b) in (0, 2)
    moved = chosen(whole, subset_indices(len(whole), 200, 0)) ^ chosen(plus, subset_indices(len(plus), 200, 0))
    assert len(moved) > 100
    assert torch.equal(private_subset(whole, None, 0), torch.arange(len(whole)))
    with pytest.raises(LandscapeError, match=r"--seed must fit in 64 bits on a private split \(-2\*\*63 <= seed < "
                                             r"2\*\*63\), got 9223372036854775808"):
        LandscapeSpec(seed=2**63, split="val", train_noise_multiplier=1.0, loss_clip=1.0)
    assert LandscapeSpec(seed=2**64 - 1).seed == 2**64 - 1  # the public test split: any seed torch takes


def test_a_private_subset_of_featurized_data_is_chosen_on_the_images():
    """With data.features the subset is chosen by the images' keys (as the carve is), then
    featurized: the choice never depends on a feature extractor's rounding in a batch."""
    from types import SimpleNamespace

    from dpwa.config import DataConfig
    from dpwa.data import load_data
    from dpwa.features import FEATURES
    from dpwa.landscape import _private_examples

    cfg = DataConfig(name="digits", val_size=100, features="scattering")
    raw = load_data(DataConfig(name="digits", val_size=100))
    run = SimpleNamespace(cfg=SimpleNamespace(data=cfg), data=load_data(cfg, withhold_train=True))
    for split, part in (("train", raw.train), ("val", raw.val)):
        idx = private_subset(part, 30, 4)
        got = _private_examples(run, split, 30, 4)
        assert torch.equal(got.y, part.y[idx])
        torch.testing.assert_close(got.x, FEATURES["scattering"](raw.normalize(part.x[idx])))


def test_train_surface_is_charged_once_and_matches_a_float64_reference(runs, tmp_path):
    from safetensors.torch import load_file

    from dpwa.data import load_data
    from dpwa.run_folder import load_run

    first, _, ledger = runs
    known = {r.run_id for r in Ledger(ledger).runs()}
    sigma, clip, n, seed = 2.0, 2.0, 120, 3
    spec = LandscapeSpec(dims=2, points=(3, 2), split="train", examples=n, seed=seed, batch_size=50,
                         train_noise_multiplier=sigma, loss_clip=clip)
    r = landscape_run(first, spec, out=tmp_path, noise_generator=torch.Generator().manual_seed(11))
    (query,) = [q for q in Ledger(ledger).runs() if q.run_id not in known]
    assert query.status == "committed" and query.dataset == "digits" and query.run_id == r["charged"]["query_run_id"]
    assert query.planned == query.spent == (Gaussian(noise_multiplier=sigma, count=6),)

    # the reference: float64, one example at a time, clipped, the same noise replayed in grid order
    run = load_run(first)
    train = load_data(run.cfg.data).train
    idx = private_subset(train, n, seed)
    assert len(idx) == n and not torch.equal(idx, subset_indices(len(train), n, seed))
    model = copy.deepcopy(run.model).double().eval()
    params = dict(model.named_parameters())
    origin = {k: p.detach().clone() for k, p in params.items()}
    stored = load_file(tmp_path / "random-2d-train-directions.safetensors")
    noise = torch.Generator().manual_seed(11)
    clipped = 0
    with torch.no_grad():
        for i, a in enumerate(r["grid"]["x"]):
            for j, b in enumerate(r["grid"]["y"]):
                for k, p in params.items():
                    p.copy_(origin[k] + a * stored[f"x/{k}"].double() + b * stored[f"y/{k}"].double())
                total = 0.0
                for e in idx.tolist():
                    x = run.data.normalize(train.x[e:e + 1]).double()
                    loss = float(F.cross_entropy(model(x), train.y[e:e + 1]))
                    clipped += loss > clip
                    total += min(max(loss, 0.0), clip)
                noisy = total + float(torch.normal(0.0, sigma * clip, size=(1,), dtype=torch.float64,
                                                   generator=noise)[0])
                assert r["values"]["loss"][i][j] == pytest.approx(noisy / n, abs=1e-5)
    assert 0 < clipped < 6 * n  # the clip binds for some examples, not all


def test_the_linear_first_layer_shortcut_is_exact():
    """ScatterNet + CNN: the first conv's outputs at origin and along each direction, kept once,
    give the same surface as the plain forward (random directions, and a target that moves biases)."""
    from dpwa.landscape import Logits, split_metrics, target_direction
    from dpwa.models.cnn import scatter_cnn

    torch.manual_seed(0)
    model = scatter_cnn(in_channels=6, num_classes=3, width=8, input_norm="private").eval()
    x, y = torch.randn(50, 6, 8, 8), torch.randint(0, 3, (50,))
    batches = [(x[:30], y[:30]), (x[30:], y[30:])]
    origin = state_of(model)
    other = {k: v if k.startswith("0.") else v + 0.1 * torch.randn_like(v) for k, v in origin.items()}
    g = torch.Generator().manual_seed(0)
    grid = Grid.linspace((-1.0, 1.5), 4, (-1.0, 1.0), 3)
    for dirs in ([random_direction(model, g), random_direction(model, g)],
                 [target_direction(origin, other), random_direction(model, g)]):
        fast = Logits(model, batches, lambda a: a, origin, dirs)
        plain = Logits(model, batches, lambda a: a, origin, dirs, max_cache_bytes=0)
        assert fast.cache is not None and fast.head == 1 and plain.cache is None
        a = surface(model, origin, dirs, grid, split_metrics(fast))
        b = surface(model, origin, dirs, grid, split_metrics(plain))
        for k in ("loss", "accuracy", "nll"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    other["0.mean"] = other["0.mean"] + 0.1  # another run's released input statistics: the input moves
    assert Logits(model, batches, lambda a: a, origin, [target_direction(origin, other)]).cache is None


@pytest.mark.parametrize("args, needle", [
    (["--split", "train", "--train-noise-multiplier", "5", "--loss-clip", "inf"], "--loss-clip finite and > 0, got 5.0 and inf"),
    (["--split", "train", "--train-noise-multiplier", "1e-200", "--loss-clip", "2"], "finite and >= 1e-50 (the accountants' floor)"),
    (["--seed", str(10**23)], "--seed must lie in -2**63 <= seed < 2**64, got 100000000000000000000000"),
    # linspace(0, inf) puts NaN and inf weights at every point: charged for losses that say nothing
    (["--split", "train", "--train-noise-multiplier", "5", "--loss-clip", "2", "--range", "0", "inf"],
     "--range x takes finite MIN MAX with MIN < MAX, got [0.0, inf]"),
    # float32 weights overflow at the second point, after the first was charged
    (["--split", "train", "--train-noise-multiplier", "5", "--loss-clip", "2", "--range", "0", "5e299"],
     "the grid reaches coordinate 5e+299"),
    (["--between", "raw", "ema", "--method", "ema"], "--method ema with --between raw ema: the centre is FROM (raw)"),
])
def test_bad_budget_values_and_seeds_are_refused_before_anything_is_charged(runs, capsys, args, needle):
    """An infinite clip would charge for noise of infinite std; a noise multiplier under the
    accountants' floor would break the ledger's arithmetic; torch takes no seed past 64 bits; a
    grid past the weights' dtype pays for points it cannot compute; --method next to --between
    was ignored."""
    first, _, ledger = runs
    before = ledger_snapshot(ledger)
    assert main(["landscape", str(first), "--dims", "1", "--points", "3", "--no-progress", *args]) == 2
    assert needle in capsys.readouterr().err and ledger_snapshot(ledger) == before


def test_an_output_folder_that_cannot_be_written_is_refused_before_the_query_is_charged(runs, tmp_path, capsys):
    """The released values would be lost after the charge."""
    first, _, ledger = runs
    blocker = tmp_path / "afile"
    blocker.write_text("")
    before = ledger_snapshot(ledger)
    for out in (blocker, blocker / "sub"):
        assert main(["landscape", str(first), "--split", "train", "--train-noise-multiplier", "5", "--loss-clip", "2",
                     "--dims", "1", "--points", "3", "--no-progress", "--out", str(out)]) == 2
        assert f"--out='{out}' cannot hold the landscape's files" in capsys.readouterr().err
    assert ledger_snapshot(ledger) == before


def test_a_surface_with_no_finite_value_draws_empty_panels(tmp_path):
    """A finite range can still overflow the logits at every point (loss NaN): the contour plot
    was an IndexError from the quantiles of nothing, after the values were computed."""
    from dpwa.landscape import draw_contours

    z = np.full((3, 2), np.nan)
    path = draw_contours({"loss": z, "accuracy (%)": z}, [0.0, 1.0, 2.0], [0.0, 1.0], tmp_path / "c.png")
    assert path.is_file()
