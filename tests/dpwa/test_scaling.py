"""Batch-size scaling (`dpwa.scaling`, `dpwa budget --config C --batch-size B`): Granziol et
al.'s lr rules, the noise for the same epsilon, TAN's fixed sigma/B alternative; nothing charged."""

import json
import math

import pytest

from accounting import PoissonGaussian, epsilon
from dpwa.cli import main
from dpwa.scaling import default_rule, rescale, scale_lr
from tests.conftest import ROOT, ledger_snapshot

QUICK = str(ROOT / "configs" / "quickstart.yaml")


def test_lr_rules():
    assert scale_lr(0.1, 256, 512, "linear") == pytest.approx(0.2)   # Granziol's SGD recipe: lr ~ B
    assert scale_lr(4e-4, 128, 512, "sqrt") == pytest.approx(8e-4)   # Adam: lr ~ sqrt(B)
    assert scale_lr(1.0, 1024, 256, "linear") == pytest.approx(0.25)
    assert [default_rule(n) for n in ("sgd", "adam", "adamw", "adambc", "padam")] == ["linear"] + ["sqrt"] * 4


@pytest.mark.parametrize("given", ["epsilon", "sigma"])
def test_the_proposed_noise_spends_the_configs_epsilon(given):
    n, b, new_b, steps, delta = 50000, 1024, 4096, 2000, 1e-5
    kw = {"epsilon": 4.0} if given == "epsilon" else {"noise_multiplier": 1.5}
    s = rescale(batch_size=b, new_batch_size=new_b, dataset_size=n, steps=steps, lr=1.0, rule="sqrt", delta=delta,
                accountant="rdp", **kw)
    target = 4.0 if given == "epsilon" else epsilon([PoissonGaussian(noise_multiplier=1.5, sample_rate=b / n,
                                                                     steps=steps)], delta=delta, accountant="rdp")
    assert s.target_epsilon == pytest.approx(target)
    e = s.same_epochs
    assert e.steps == math.ceil(steps * b / new_b) and e.epochs == pytest.approx(s.current.epochs)
    assert e.lr == pytest.approx(2.0)  # sqrt(4)
    spent = epsilon([PoissonGaussian(noise_multiplier=e.noise_multiplier, sample_rate=new_b / n, steps=e.steps)],
                    delta=delta, accountant="rdp")
    assert 0.99 * target <= spent <= target and spent == pytest.approx(e.epsilon)
    t = s.tan  # TAN: same steps, sigma/B fixed, lr kept
    assert (t.steps, t.lr, t.batch_size) == (steps, 1.0, new_b)
    assert t.sigma_over_b == pytest.approx(s.current.sigma_over_b)
    assert t.epsilon == pytest.approx(epsilon([PoissonGaussian(noise_multiplier=t.noise_multiplier,
                                                               sample_rate=new_b / n, steps=steps)],
                                              delta=delta, accountant="rdp"))


def test_cli_prints_the_three_settings_and_charges_nothing(capsys, ledger_path):
    assert main(["budget", "--config", QUICK, "--batch-size", "512", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["rule"] == "linear" and r["dataset_size"] == 1497 and r["charged"] is False
    assert r["same_epochs"]["steps"] == 75 and r["same_epochs"]["lr"] == pytest.approx(4.0)
    assert r["tan"]["steps"] == 150 and r["tan"]["sigma_over_b"] == pytest.approx(r["current"]["sigma_over_b"])
    assert r["same_epochs"]["epsilon"] <= 3.0 and r["step_keys"] == {"optim.warmup_steps": 10}
    assert main(["budget", "--config", QUICK, "--batch-size", "512", "--rule", "sqrt"]) == 0
    out = capsys.readouterr().out
    assert "TAN" in out and "sqrt rule" in out and "2.82843" in out  # 2 x sqrt(2)
    assert ledger_snapshot(ledger_path) is None


@pytest.mark.parametrize("argv, needle", [
    (["--batch-size", "0"], "--batch-size must be in [1, N=1497]"),
    (["--batch-size", "5000"], "--batch-size must be in [1, N=1497]"),
    ([], "--config needs --batch-size"),
    (["--batch-size", "512", "--epsilon", "2"], "drop --epsilon"),
])
def test_cli_bad_input_exits_2(capsys, argv, needle):
    assert main(["budget", "--config", QUICK, *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_rule_needs_a_config(capsys):
    assert main(["budget", "--rule", "sqrt", "--batch-size", "512"]) == 2
    assert "--rule goes with --config" in capsys.readouterr().err
