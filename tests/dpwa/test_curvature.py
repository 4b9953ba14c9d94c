"""`dpwa curvature`: stochastic Lanczos quadrature against an exact Hessian, and the verb on a
finished run (test split only; the private splits are refused before anything is read)."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from dpwa.cli import main
from dpwa.curvature import MeanLoss, density, density_grid, learning_rates, slq


@pytest.fixture(scope="module")
def small():
    """A 39-parameter MLP in float64 on random data, its MeanLoss (two batches) and exact Hessian."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(50, 5, dtype=torch.float64), torch.randint(0, 3, (50,))
    loss = MeanLoss(model, [(x[:30], y[:30]), (x[30:], y[30:])])

    def f(theta):
        parts = theta.split([math.prod(s) for s in loss.shapes])
        params = {n: p.view(s) for n, p, s in zip(loss.names, parts, loss.shapes)}
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    theta = loss.theta.detach()
    return loss, f, torch.autograd.functional.hessian(f, theta)


def test_hvp_and_gradient_match_autograd(small):
    loss, f, hessian = small
    v = torch.randn(loss.dim, dtype=torch.float64)
    torch.testing.assert_close(loss.hvp(v), hessian @ v, rtol=1e-10, atol=1e-12)
    theta = loss.theta.detach().clone().requires_grad_()
    value, grad = loss.value_and_grad()
    assert value == pytest.approx(float(f(theta).detach()), rel=1e-12)
    torch.testing.assert_close(grad, torch.autograd.grad(f(theta), theta)[0], rtol=1e-10, atol=1e-12)


def test_extreme_ritz_values_are_the_extreme_eigenvalues(small):
    loss, _, hessian = small
    eig = torch.linalg.eigvalsh(hessian)
    assert eig[0] < 0 < eig[-1]  # indefinite away from a minimum: both ends are tested
    runs = slq(loss.hvp, loss.theta.detach(), iterations=loss.dim, starts=2, seed=3)
    for theta, weights in runs:
        assert min(theta) == pytest.approx(float(eig[0]), rel=1e-6)
        assert max(theta) == pytest.approx(float(eig[-1]), rel=1e-6)
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        # every Ritz value is an eigenvalue: the Krylov space became invariant (softmax's
        # shift invariance gives a 5-fold zero eigenvalue, seen once), no spurious copies
        assert all(torch.isclose(eig, torch.tensor(t, dtype=torch.float64), atol=1e-9).any() for t in theta)


def test_density_integrates_to_one_and_rates_follow_the_spectrum(small):
    loss, _, hessian = small
    runs = slq(loss.hvp, loss.theta.detach(), iterations=12, starts=3)
    grid, width = density_grid(runs)
    assert float(torch.trapezoid(density(runs, grid, width), grid)) == pytest.approx(1.0, abs=1e-3)
    _, g = loss.value_and_grad()
    r = learning_rates(runs, float(g @ g), float(g @ hessian @ g))
    assert r["lr_cauchy"] == pytest.approx(float(g @ g / (g @ hessian @ g)))
    assert r["lr_lanczos"] == pytest.approx(2 / (r["lambda_max"] + r["lambda_median"]))
    assert r["lambda_max"] <= float(torch.linalg.eigvalsh(hessian)[-1]) + 1e-12  # Ritz values lie inside


def test_spectral_median_estimates_the_median_eigenvalue_and_the_ritz_median_does_not(small):
    """Ritz values crowd the spectrum's ends: their plain median (Granziol's lambda_median) is
    about 3x the exact median |eigenvalue| here, at every iteration count; weighted by the
    quadrature weights it is within 30% of it."""
    loss, _, hessian = small
    exact = float(torch.linalg.eigvalsh(hessian).abs().median())
    for iterations in (6, 10, 15):
        r = learning_rates(slq(loss.hvp, loss.theta.detach(), iterations=iterations, starts=10), 1.0, 1.0)
        assert r["spectral_median"] == pytest.approx(exact, rel=0.3)
        assert r["lambda_median"] > 2 * exact


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from dpwa.train import train
    from tests.dpwa.test_train import tiny

    tmp = tmp_path_factory.mktemp("curv")
    return train(tiny(tmp), ledger_path=str(tmp / "l.sqlite"), progress=False)["run_dir"]


def test_cli_writes_the_plot_and_json(finished_run, capsys):
    code = main(["curvature", str(finished_run), "--iterations", "8", "--starts", "2", "--examples", "100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (Path(finished_run) / "curvature.png").stat().st_size > 0
    r = json.loads((Path(finished_run) / "curvature.json").read_text())
    assert r["split"] == "test" and r["examples"] == 100 and r["charged"] is False
    assert set(r["methods"]) == {"raw", "ema", "polyak"}  # what the quickstart keeps
    raw = r["methods"]["raw"]
    assert raw["lambda_max"] >= raw["top_eigenvalues"][-1] and raw["lr_lanczos"] > 0
    assert "lambda_max" in out and "g'g/g'Hg" in out


@pytest.mark.parametrize("split", ["train", "val"])
def test_private_splits_are_refused_before_anything_is_read(finished_run, monkeypatch, capsys, split):
    import dpwa.data
    import dpwa.run_folder

    def read(*a, **k):
        raise AssertionError("data was read")

    monkeypatch.setattr(dpwa.data, "load_data", read)
    monkeypatch.setattr(dpwa.run_folder, "load_run", read)
    assert main(["curvature", str(finished_run), "--split", split]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "private" in err and "charged version is not built" in err


def test_a_seed_torch_cannot_take_is_refused(finished_run, capsys):
    assert main(["curvature", str(finished_run), "--seed", str(2**64)]) == 2
    assert "--seed must lie in -2**63 <= seed < 2**64, got 18446744073709551616" in capsys.readouterr().err
