from pathlib import Path

import pytest
import torch

from dpwa.averaging import make_averagers
from dpwa.config import ConfigError, RunConfig, config_from_yaml_text, config_to_yaml, load_config
from dpwa.schedules import Schedule

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    first = path.read_text().splitlines()[0]  # opens with its command
    assert first.startswith((f"# dpwa train configs/{path.name}", f"# dpwa finetune configs/{path.name}")), first
    assert config_from_yaml_text(config_to_yaml(cfg)) == cfg  # the run folder's copy round-trips
    if cfg.train.steps is not None:  # the checks that need the run length pass too
        schedule = Schedule(cfg.optim, cfg.train.steps, swa_start=cfg.averaging.swa_start)
        make_averagers(cfg.averaging, torch.nn.Linear(2, 2), total_steps=cfg.train.steps,
                       is_minimum=schedule.is_minimum)


def test_overrides():
    cfg = load_config(CONFIGS[0], ["optim.lr=4", "augmult.k=8", "privacy.epsilon=1.5"])
    assert cfg.optim.lr == 4.0 and cfg.augmult.k == 8 and cfg.privacy.epsilon == 1.5


@pytest.mark.parametrize("overrides, needle", [
    (["optim.lrr=3"], "optim.lrr"),
    (["nonsense=1"], "nonsense"),
    (["privacy.delta=1"], "privacy.delta must be in (0, 1), got 1.0"),
    (["privacy.delta=0"], "privacy.delta"),
    (["augmult.k=0"], "augmult.k must be >= 1, got 0"),
    (["optim.lr=-1"], "optim.lr must be > 0, got -1.0"),
    (["train.steps=abc"], "abc"),
    (["privacy.noise_multiplier=3"], "exactly one of privacy.epsilon"),
    (["privacy.accountant=moments"], "moments"),
    (["model.groups=0"], "model.groups"),
    (["data.name=imagenet"], "imagenet"),
    (["train.epochs=3"], "only one of train.steps and train.epochs"),
    (["augmult.k=2", "data.features=scattering"], "augmult.k=2 with data.features=scattering"),
    (["data.features=sift"], "data.features must be none or one of scattering; got 'sift'"),
    (["optim.lr"], "key.sub=value"),
])
def test_bad_values_name_the_key(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(CONFIGS[0], overrides)
    assert needle in str(info.value)


def test_privacy_must_be_stated(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train: {steps: 10}\n")
    with pytest.raises(ConfigError, match="give privacy.epsilon"):
        load_config(cfg)


def test_steps_or_epochs(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {epochs: 2.5}\n")  # epochs alone: no default steps collide
    assert load_config(cfg).train.epochs == 2.5 and load_config(cfg).train.steps is None
    cfg.write_text("privacy: {epsilon: 1}\n")
    with pytest.raises(ConfigError, match="give train.steps"):
        load_config(cfg)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [unclosed\n")
    with pytest.raises(ConfigError, match="Cannot parse"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
