"""The statistics mechanism (model.input_norm=private): its sums against a float64 loop over
single examples, its noise, its count and refusal, and its charge in the ledger composed with
the DP-SGD steps; a resumed run never releases twice."""

from pathlib import Path

import pytest
import torch

from accounting import Gaussian, Ledger, epsilon
from accounting.errors import BudgetExceededError
from dpwa import statistics as stats_module
from dpwa.averaging import EMA
from dpwa.config import ConfigError
from dpwa.mechanism import ReleaseRefused
from dpwa.models import create_model
from dpwa.models.standardize import set_statistics
from dpwa.statistics import StatisticsMechanism, clipped_moment_sums
from dpwa.train import train
from tests.conftest import ledger_snapshot
from tests.dpwa.test_train import tiny

PRIVATE = ("data.features=scattering", "model.name=scatter_cnn", "model.input_norm=private", "augmult.k=1",
           "train.batch_size=256", "train.physical_batch_size=256", "optim.lr=2", "feature_stats.mean_clip=0.5",
           "feature_stats.second_moment_clip=0.8")


def reference_sums(x: torch.Tensor, c1: float, c2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One example at a time, float64: clip its channel means and mean squares, add up."""
    s1 = torch.zeros(x.shape[1], dtype=torch.float64)
    s2 = torch.zeros(x.shape[1], dtype=torch.float64)
    for example in x.double():
        m = torch.stack([channel.mean() for channel in example])
        q = torch.stack([(channel * channel).mean() for channel in example])
        s1 += m * min(1.0, c1 / float(m.norm()))
        s2 += q * min(1.0, c2 / float(q.norm()))
    return s1, s2


def test_clipped_sums_match_a_loop_over_single_examples():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 5, 3, 4, generator=g) * torch.linspace(0.1, 3, 37).view(-1, 1, 1, 1) + 0.3
    for c1, c2 in ((0.5, 1.0), (100.0, 100.0), (1e-3, 1e-3)):  # some clipped, none, all
        got = clipped_moment_sums(x, c1, c2, chunk=8)
        want = reference_sums(x, c1, c2)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_release_adds_the_calibrated_noise_and_counts_two_releases():
    x = torch.rand(50, 4, 2, 2, dtype=torch.float64)
    mech = StatisticsMechanism(noise_multiplier=3.0, mean_clip=0.4, second_moment_clip=0.6, dataset_size=50,
                               generator=torch.Generator().manual_seed(5))
    out = mech.release(x)
    s1, s2 = reference_sums(x, 0.4, 0.6)
    g = torch.Generator().manual_seed(5)
    n1 = torch.normal(0.0, 3.0 * 0.4, size=(4,), dtype=torch.float64, generator=g)
    n2 = torch.normal(0.0, 3.0 * 0.6, size=(4,), dtype=torch.float64, generator=g)
    mean = (s1 + n1) / 50
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.var, ((s2 + n2) / 50 - mean ** 2).clamp_min(0))
    assert mech.released == 2 and mech.events() == [Gaussian(noise_multiplier=3.0, count=2)]


def test_an_example_with_non_finite_features_counts_as_zero_and_the_noise_is_secret():
    """inf times its clip factor 0 is NaN: one such example made the released statistics NaN
    whatever the noise. It counts as 0, as in the loop without it. Without a generator the
    noise is not torch's global one (which torch.manual_seed makes known)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, 2, 2, generator=g, dtype=torch.float64)
    bad = x.clone()
    bad[4, 0, 1, 1], bad[7, 2, 0, 0] = float("inf"), float("nan")
    keep = [i for i in range(12) if i not in (4, 7)]
    for got, want in zip(clipped_moment_sums(bad, 0.5, 0.8), reference_sums(x[keep], 0.5, 0.8)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    def release():
        torch.manual_seed(0)
        return StatisticsMechanism(noise_multiplier=3.0, mean_clip=0.5, second_moment_clip=0.8,
                                   dataset_size=12).release(bad)

    a, b = release(), release()
    assert bool(torch.isfinite(a.mean).all() and torch.isfinite(a.var).all()) and not torch.equal(a.mean, b.mean)


class Unreadable:
    """Features that fail on any read: a refusal must come first."""

    def __len__(self):
        return 10

    def __getattr__(self, name):
        raise AssertionError(f"read {name} of the private features")


def test_a_release_beyond_the_reservation_is_refused_before_reading():
    x = torch.rand(10, 3, 2, 2)
    mech = StatisticsMechanism(noise_multiplier=8.0, mean_clip=1.0, second_moment_clip=1.0, dataset_size=10)
    mech.release(x)
    with pytest.raises(ReleaseRefused, match="reserved 2 statistics releases"):
        mech.release(Unreadable())
    none = StatisticsMechanism(noise_multiplier=8.0, mean_clip=1.0, second_moment_clip=1.0, dataset_size=10,
                               releases=0)
    with pytest.raises(ReleaseRefused):
        none.release(Unreadable())
    assert none.events() == []


def test_standardize_layer_and_averagers_share_the_released_statistics():
    model = create_model("scatter_cnn", in_channels=6, num_classes=3, input_norm="private")
    ema = EMA(model, decay=0.9)
    x = torch.randn(2, 6, 4, 4)
    assert torch.allclose(model[0](x), x, atol=1e-6)  # the identity until set
    mean, var = torch.arange(6.0), torch.linspace(0.5, 2, 6)
    assert set_statistics(model, mean, var) == 1
    want = (x - mean.view(-1, 1, 1)) / torch.sqrt(var.view(-1, 1, 1) + 1e-5)
    torch.testing.assert_close(model[0](x), want)
    torch.testing.assert_close(ema.model[0](x), want)  # the average's copy follows the live buffers
    with pytest.raises(ConfigError, match="model.input_norm=private is for models with an input normalisation"):
        create_model("cnn_tanh", in_channels=3, num_classes=3, input_norm="private")


def test_a_channel_released_with_variance_zero_is_dropped_as_in_tramer_boneh():
    """Released var 0 means the noise swamped the channel's second moment: Tramer & Boneh's
    standardize zeroes it, rather than scale it by 1 / sqrt(eps) ~ 316. Weights saved before
    the mask existed (no `keep` entry) load with every channel kept and compute as trained."""
    model = create_model("scatter_cnn", in_channels=4, num_classes=3, input_norm="private")
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    mean, var = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([1.0, 0.0, 0.25, 0.0])
    set_statistics(model, mean, var)
    assert model[0].keep.tolist() == [True, False, True, False]
    out = model[0].double()(x)
    for c in range(4):
        want = torch.zeros_like(x[:, c]) if var[c] == 0 else (x[:, c] - mean[c].double()) / torch.sqrt(
            var[c].double() + 1e-5)
        torch.testing.assert_close(out[:, c], want)
    old = {k: v for k, v in model.state_dict().items() if not k.endswith("keep")}
    again = create_model("scatter_cnn", in_channels=4, num_classes=3, input_norm="private")
    again.load_state_dict(old)
    assert again[0].keep.all()
    torch.testing.assert_close(again[0].double()(x)[:, 1], (x[:, 1] - 0.2) / (1e-5) ** 0.5)


def test_run_charges_the_statistics_and_composes_them(tmp_path):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, *PRIVATE, "train.steps=8", "privacy.epsilon=4")
    dry = train(cfg, ledger_path=str(led), progress=False, dry_run=True)
    report = train(cfg, ledger_path=str(led), progress=False)
    run = Ledger(str(led)).run(report["run_id"])
    assert run.status == "committed"
    assert run.spent[0] == Gaussian(noise_multiplier=8.0, count=2) and run.spent[1].steps == 8
    joint = epsilon(run.spent, delta=cfg.privacy.delta)
    assert report["epsilon"] == pytest.approx(joint, rel=1e-9) == pytest.approx(dry["epsilon"], rel=1e-9)
    assert 3.9 < joint <= 4.0  # the DP-SGD noise was calibrated for both together
    alone = epsilon(run.spent[1:], delta=cfg.privacy.delta)
    assert alone < joint
    assert report["feature_statistics"]["releases"] == 2
    state = torch.load(Path(report["run_dir"]) / "checkpoint.pt", weights_only=True)
    assert state["statistics"] == {"released": 2, "releases": 2}
    assert not torch.equal(state["model"]["0.var"], torch.full_like(state["model"]["0.var"], 1 - 1e-5))
    # what the post-training tools (dpwa eval, curvature, landscape) report: the same joint epsilon
    from dpwa.run_folder import load_run

    assert load_run(Path(report["run_dir"])).epsilon == pytest.approx(joint, rel=1e-9)


def test_over_budget_refuses_before_the_statistics_are_computed(tmp_path, monkeypatch):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, *PRIVATE, "train.steps=8", "privacy.epsilon=4")
    Ledger(str(led)).set_budget("digits", epsilon=3.0, delta=cfg.privacy.delta)
    before = ledger_snapshot(led)
    monkeypatch.setattr(stats_module, "clipped_moment_sums", lambda *a, **k: pytest.fail("statistics computed"))
    with pytest.raises(BudgetExceededError):
        train(cfg, ledger_path=str(led), progress=False)
    assert ledger_snapshot(led) == before and not (tmp_path / "runs").exists()


def test_a_resumed_run_takes_its_statistics_from_the_checkpoint(tmp_path, monkeypatch):
    led = tmp_path / "l.sqlite"
    cfg = tiny(tmp_path, *PRIVATE, "train.steps=8", "train.checkpoint_every=100", "privacy.epsilon=4")
    stopped = train(cfg, ledger_path=str(led), progress=False, stop_after=3)  # no checkpoint but step 0's
    run_dir = Path(stopped["run_dir"])
    saved = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 0 and saved["statistics"]["released"] == 2
    assert Ledger(str(led)).run(stopped["run_id"]).spent == (Gaussian(noise_multiplier=8.0, count=2),)
    monkeypatch.setattr(StatisticsMechanism, "release", lambda *a: pytest.fail("released twice"))
    report = train(resume=run_dir, ledger_path=str(led), progress=False)
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.testing.assert_close(final["model"]["0.mean"], saved["model"]["0.mean"])
    assert Ledger(str(led)).run(report["run_id"]).spent[0] == Gaussian(noise_multiplier=8.0, count=2)


def test_input_norm_private_needs_a_standardize_layer_and_private_data(tmp_path):
    import torch.nn as nn

    cfg = tiny(tmp_path, *PRIVATE, "train.steps=2", "privacy.epsilon=4")
    plain = nn.Sequential(nn.Flatten(), nn.Linear(81 * 4, 10))
    with pytest.raises(ConfigError, match="needs a dpwa.models.standardize.Standardize layer"):
        train(cfg, ledger_path=str(tmp_path / "l.sqlite"), progress=False, model=plain)
    assert not (tmp_path / "l.sqlite").exists()
    with pytest.raises(ConfigError, match="feature_stats.\\* configures the release of model.input_norm=private"):
        tiny(tmp_path, "feature_stats.noise_multiplier=4")
    with pytest.raises(ConfigError, match="feature_stats.mean_clip must be > 0"):
        tiny(tmp_path, *PRIVATE, "feature_stats.mean_clip=0")
