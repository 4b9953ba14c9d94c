import json

import pytest

from dpwa.cli import main

Q = "0.08192"


def run_json(capsys, *args):
    assert main(["budget", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_epsilon(capsys):
    out = run_json(capsys, "--sigma", "3", "--sample-rate", Q, "--steps", "2468", "--delta", "1e-5")
    assert out["solved_for"] == "epsilon" and out["accountant"] == "prv"
    assert out["epsilon"] == pytest.approx(6.540, abs=5e-4)


@pytest.mark.parametrize("accountant, expected", [("rdp", 7.046), ("pld", 6.529)])
def test_epsilon_other_accountants(capsys, accountant, expected):
    out = run_json(capsys, "--sigma", "3", "--sample-rate", Q, "--steps", "2468", "--delta", "1e-5",
                   "--accountant", accountant)
    assert out["epsilon"] == pytest.approx(expected, abs=5e-4)


def test_noise_multiplier(capsys):
    out = run_json(capsys, "--epsilon", "8", "--delta", "1e-5", "--sample-rate", Q, "--steps", "3000")
    assert out["solved_for"] == "noise_multiplier"
    assert 0.99 * 8 <= out["epsilon_spent"] <= 8


def test_steps_from_batch_and_dataset_size(capsys):
    out = run_json(capsys, "--epsilon", "1", "--sigma", "10", "--delta", "1e-5", "--batch-size", "4096",
                   "--dataset-size", "50000", "--accountant", "rdp")
    assert out["solved_for"] == "steps" and out["sample_rate"] == pytest.approx(0.08192)
    assert out["steps"] == 895 and out["epsilon_spent"] <= 1
    assert out["epochs"] == pytest.approx(895 * 0.08192)


def test_epochs_in_place_of_steps(capsys):
    out = run_json(capsys, "--sigma", "3", "--delta", "1e-5", "--batch-size", "4096", "--dataset-size", "50000",
                   "--epochs", "200", "--accountant", "rdp")
    assert out["steps"] == 2442


def test_delta(capsys):
    out = run_json(capsys, "--sigma", "3", "--sample-rate", Q, "--steps", "2468", "--epsilon", "7.046",
                   "--accountant", "rdp")
    assert out["solved_for"] == "delta" and out["delta"] <= 1e-5


def test_human_output(capsys):
    assert main(["budget", "--sigma", "3", "--sample-rate", Q, "--steps", "2468", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "prv (upper bound)" in out and "6.5396" in out and "<- computed" in out


def test_steps_that_fit_no_step_say_so(capsys):
    assert main(["budget", "--epsilon", "1", "--sigma", "0.3", "--sample-rate", "0.5", "--delta", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "not even one step fits epsilon 1: one step spends 17.9" in out


def test_large_delta_warns(capsys):
    assert main(["budget", "--sigma", "3", "--batch-size", "10", "--dataset-size", "100", "--steps", "10",
                 "--delta", "0.05", "--accountant", "rdp"]) == 0
    assert "not below 1/N" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["budget", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_scaling_names_the_schedules_other_learning_rates(tmp_path, capsys):
    """At the same epochs optim.lr moves by the rule; min_lr must move with it (it must stay <= lr)."""
    cfg = tmp_path / "cyc.yaml"
    cfg.write_text("privacy: {epsilon: 3}\ntrain: {steps: 100, batch_size: 256}\n"
                   "optim: {lr: 2.0, schedule: cyclic, min_lr: 0.5, cycle_length: 10}\n")
    assert main(["budget", "--config", str(cfg), "--batch-size", "32", "--dataset-size", "1497"]) == 0
    assert "learning rates; at the same epochs scale them by 0.125 with optim.lr: optim.min_lr=0.5" in \
        capsys.readouterr().out


def test_scaling_names_a_methods_step_keys_and_rescales_a_run_its_method_lays_out(tmp_path, capsys):
    """A method's own step counts are among the keys to scale; EDST, whose fields fix train.steps,
    is rescaled as any run (the new length is for a config with those keys scaled)."""
    cfg = tmp_path / "edst.yaml"
    cfg.write_text("privacy: {epsilon: 3}\ntrain: {steps: 20, batch_size: 256}\n"
                   "method: {name: edst, sparsity_end: 8, sparsity_update_every: 3, edst_exploration: 8, "
                   "edst_phases: 3, edst_phase_steps: 4}\n")
    assert main(["budget", "--config", str(cfg), "--batch-size", "128", "--dataset-size", "1497"]) == 0
    out = capsys.readouterr().out
    assert ("these keys count steps; at the same epochs scale them by 2: method.sparsity_end=8, "
            "method.sparsity_update_every=3, method.edst_exploration=8, method.edst_phase_steps=4") in out
