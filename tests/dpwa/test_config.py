import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from dpwa.averaging import make_averagers
from dpwa.config import ConfigError, RunConfig, config_from_yaml_text, config_to_yaml, load_config
from dpwa.schedules import Schedule

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


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
    (["optim.lr=1e300"], "optim.lr must fit in float32"),
    # seed + 1 overflowed the sampling generator after the reservation: a run reserved in full, a traceback
    (["train.seed=18446744073709551615"], "train.seed must be in [-2**63, 2**64 - 16), got 18446744073709551615"),
    ([f"privacy.noise_seed={-2**63 - 1}"], "privacy.noise_seed must be in [-2**63, 2**64 - 16) or null"),
    ([f"name={'x' * 300}"], "name must be at most 200 bytes (the run folder's name appends 25 to it), got 300"),  # the first optimizer step overflowed, after a charged release
    (["optim.weight_decay=1e300"], "optim.weight_decay (x optim.lr, where AdamW multiplies them) must fit in float32"),
    (["train.steps=abc"], "abc"),
    (["privacy.noise_multiplier=3"], "exactly one of privacy.epsilon"),
    (["privacy.epsilon=null", "privacy.noise_multiplier=1e-100"], "privacy.noise_multiplier must be finite and >= 1e-50"),
    (["train.val_noise=1e-300"], "train.val_noise must be 0 or a finite number >= 1e-50"),
    (["privacy.accountant=moments"], "moments"),
    (["model.groups=0"], "model.groups"),
    (["data.name=imagenet"], "imagenet"),
    (["train.epochs=3", "train.steps=5"], "only one of train.steps and train.epochs"),
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


def test_an_override_of_the_run_length_replaces_the_files(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {epochs: 2.5}\n")
    got = load_config(cfg, ["train.steps=7"]).train  # no train.epochs=null needed
    assert (got.steps, got.epochs) == (7, None)
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {steps: 10}\n")
    got = load_config(cfg, ["train.epochs=3"]).train
    assert (got.steps, got.epochs) == (None, 3.0)
    assert load_config(cfg, ["train.epochs=null", "train.steps=4"]).train.steps == 4  # the old spelling still works
    with pytest.raises(ConfigError, match="only one of train.steps and train.epochs"):
        load_config(cfg, ["train.epochs=3", "train.steps=4"])  # both on the command line: ambiguous
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {steps: 10, epochs: 2}\n")
    with pytest.raises(ConfigError, match="only one of train.steps and train.epochs"):
        load_config(cfg)  # both in the file: still an error


def _tiny_npz(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for part, n in (("train", 20), ("test", 10)):
        np.savez(folder / f"{part}.npz", x=rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
                 y=np.arange(n) % 2)


def test_data_root_is_read_from_the_config_files_folder(tmp_path, monkeypatch):
    from dpwa.data import load_data

    project = tmp_path / "project"
    _tiny_npz(project / "data" / "tiny")
    (project / "configs").mkdir()
    cfg = project / "configs" / "c.yaml"
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {steps: 1}\ndata: {name: npz, root: ../data/tiny}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    got = load_config(Path("..") / "project" / "configs" / "c.yaml")  # a relative config path, from another cwd
    assert got.data.root == str(project / "data" / "tiny")  # absolute: the run folder's copy works anywhere
    assert config_from_yaml_text(config_to_yaml(got)).data.root == got.data.root
    assert len(load_data(got.data).train) == 20  # the data is found from the other directory
    # an absolute root and a ~ root stay as written
    cfg.write_text(f"privacy: {{epsilon: 1}}\ntrain: {{steps: 1}}\ndata: {{name: npz, root: {elsewhere}}}\n")
    assert load_config(cfg).data.root == str(elsewhere)
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {steps: 1}\ndata: {name: cifar10, root: ~/cifar}\n")
    assert load_config(cfg).data.root == "~/cifar"


def test_a_data_root_override_is_read_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "configs").mkdir()
    cfg = tmp_path / "configs" / "c.yaml"
    cfg.write_text("privacy: {epsilon: 1}\ntrain: {steps: 1}\ndata: {name: npz, root: ../data/tiny}\n")
    monkeypatch.chdir(tmp_path)
    got = load_config(cfg, ["data.root=mine/cifar"])  # as a shell user means it: from where they stand
    assert got.data.root == str(tmp_path / "mine" / "cifar")
    assert load_config(None, ["data.name=npz", "data.root=/abs/cifar", "privacy.epsilon=1",
                              "train.steps=1"]).data.root == "/abs/cifar"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_data_roots_work_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = load_config(path).data.root
    assert root is None or root.startswith("~") or os.path.isabs(root), root
    written = (path.read_text().split("root:", 1) + [""])[1].split()[:1]
    if written and not written[0].startswith(("~", "/")):  # the npz configs: ../shared/data beside the repository
        assert root == os.path.normpath(ROOT.parent / "shared" / "data" / "cifar10")


@pytest.mark.parametrize("edit, needle", [
    (lambda x, y: (x, y[:-3]), "needs 'y' as one integer label >= 0 per image of 'x'; got y int64 (17,) (min 0) "
                               "for x (20, 8, 8, 3)"),
    (lambda x, y: (x, np.where(np.arange(len(y)) == 4, -1, y)), "(min -1)"),
    (lambda x, y: (x, y[:, None]), "got y int64 (20, 1)"),
    (lambda x, y: (x, y.astype(np.float32)), "got y float32 (20,)"),
    (lambda x, y: (x.transpose(0, 3, 1, 2), y), "C = 1, 3 or 4 channels last, got shape (20, 3, 8, 8)"),
    (lambda x, y: (x[:, :4, :4], y), "train.npz holds images of shape (C, H, W) (3, 4, 4) but test.npz (3, 8, 8)"),
])
def test_npz_arrays_that_do_not_fit_are_refused_when_loaded(tmp_path, edit, needle):
    """Before the reservation: a step would crash on them, naming an index its secret batch drew."""
    from dpwa.data import DataError, load_data

    _tiny_npz(tmp_path / "d")
    with np.load(tmp_path / "d" / "train.npz") as f:
        x, y = edit(f["x"], f["y"].astype(np.int64))
    np.savez(tmp_path / "d" / "train.npz", x=x, y=y)
    with pytest.raises(DataError) as info:
        load_data(load_config(None, ["privacy.epsilon=1", "train.steps=1", "data.name=npz",
                                     f"data.root={tmp_path / 'd'}"]).data)
    assert needle in str(info.value)


def test_a_config_without_groups_or_ws_gets_each_models_paper_defaults():
    """model.groups / model.weight_standardization left out (null): each model builds as its
    paper has it (scatter_cnn: GroupNorm(27) on 243 feature channels, plain convs, Tramer &
    Boneh; wrn16_4: GroupNorm(16), WS convs, De et al.), not with one global 16 and WS that
    scatter_cnn's 243 channels cannot take. A number of groups that does not divide is a
    ModelError (exit 2) naming model.groups, before any reservation."""
    from torch import nn

    from dpwa.models import ModelError, create_model
    from dpwa.models.from_config import build_model
    from dpwa.models.ws import WSConv2d

    class Data:
        in_channels, num_classes = 243, 10

    cfg = load_config(None, ["model.name=scatter_cnn", "privacy.epsilon=1", "train.steps=1"])
    assert cfg.model.groups is None and cfg.model.weight_standardization is None
    scatter = build_model(cfg, Data())
    assert isinstance(scatter[0], nn.GroupNorm) and scatter[0].num_groups == 27
    assert not any(isinstance(m, WSConv2d) for m in scatter.modules())
    wrn = create_model("wrn16_4", in_channels=3, num_classes=10)
    assert {m.num_groups for m in wrn.modules() if isinstance(m, nn.GroupNorm)} == {16}
    assert any(isinstance(m, WSConv2d) for m in wrn.modules())
    with pytest.raises(ModelError, match=r"model.groups=16 does not divide .*243"):
        create_model("scatter_cnn", in_channels=243, num_classes=10, groups=16)


@pytest.mark.parametrize("overrides, needle", [
    (["averaging.swa_every=2"], "averaging.swa_every=2 has no effect without averaging.swa or averaging.swag"),
    (["averaging.swag_rank=5"], "averaging.swag_rank=5 has no effect without averaging.swag=true"),
    (["model.film_gain=2"], "model.film_gain=2.0 has no effect without model.film_members >= 2"),
])
def test_a_setting_whose_feature_is_off_is_warned_of(overrides, needle):
    """They were accepted and did nothing (design: an intent typed wrong is not ignored)."""
    with pytest.warns(UserWarning, match=re.escape(needle)):
        load_config(CONFIGS[0], overrides)
