"""timm NF models made DP-ready: per-example gradients of every parameter against a loop over
single examples, the rewrite preserves the function, freezing modes, pretrained weights
(round trip, timm naming, refusals), ImageFolder data on real images, non-private
pretraining on public data, and bad input refused before any ledger charge."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from accounting import Ledger
from dpwa.checkpoint import save_weights
from dpwa.cli import main
from dpwa.config import ConfigError, DataConfig, load_config
from dpwa.data import DataError, ImageFiles, load_data
from dpwa.engines import EngineError, FastEngine
from dpwa.models import ModelError, create_model
from dpwa.models.nfnet import ScalarGain, _tiny_cfg, _TINY, create_nf, make_dp_ready
from dpwa.train import train
from tests.conftest import ROOT, SHARED_DATA, ledger_snapshot
from tests.dpwa.test_engines import assert_sums_close, loop_reference

IMAGENETTE = SHARED_DATA / "imagenette-small"


def timm_tiny(name, num_classes=4, seed=0):
    """The raw timm model (timm's NormFreeNet class, no dpwa rewrite) with non-trivial weights:
    random head and skip-init gains (they start at zero)."""
    from timm.models.nfnet import NormFreeNet

    torch.manual_seed(seed)
    model = NormFreeNet(_tiny_cfg(**_TINY[name]), num_classes=num_classes)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("skipinit_gain") or n.startswith("head."):
                p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("name", sorted(_TINY))
def test_rewrite_keeps_the_function(name):
    raw = timm_tiny(name).double().eval()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    want = raw(x)
    ready = make_dp_ready(raw)
    assert not any(getattr(m, "inplace", False) for m in ready.modules())
    assert not any(isinstance(m, nn.Conv1d) for m in ready.modules())
    assert torch.allclose(ready(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", sorted(_TINY))
@pytest.mark.parametrize("k", [1, 2])
def test_per_example_gradients_of_every_parameter_match_a_loop(name, k):
    model = make_dp_ready(timm_tiny(name)).double()
    g = torch.Generator().manual_seed(1)
    views = torch.randn(4, k, 3, 32, 32, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 4, (4,), generator=g)
    want, want_norms = loop_reference(model, views, labels, clip_norm=1e9)  # no clipping: raw per-example sums
    clip = float(want_norms.median())
    want, _ = loop_reference(model, views, labels, clip_norm=clip)
    got, _, norms = FastEngine(model).clipped_sum(views, labels, clip)
    assert torch.allclose(norms, want_norms, rtol=1e-5)
    assert set(got) == {p for p in model.parameters()}  # every parameter, skip-init gains included
    assert_sums_close(got, want, rtol=1e-5)
    if name == "nf_micro_dm":
        assert any(isinstance(m, ScalarGain) for m in model.modules())


def test_unsupported_trainable_parameters_are_listed_up_front():
    model = make_dp_ready(timm_tiny("nf_micro"))
    model.extra = nn.LayerNorm(4)  # a trainable layer without a per-example rule
    with pytest.raises(EngineError, match=r"extra.weight \(no per-example rule for LayerNorm\), extra.bias"):
        FastEngine(model)


@pytest.mark.parametrize("trainable, stages", [("all", 0), ("head", 0), ("stages", 1)])
def test_freezing_modes(tmp_path, trainable, stages):
    root = tmp_path / "data"
    root.mkdir()
    rng = np.random.default_rng(0)
    for part, n in (("train", 96), ("test", 40)):
        np.savez(root / f"{part}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 y=rng.integers(0, 4, n))
    cfg = load_config(None, [f"out_dir={tmp_path / 'runs'}", "data.name=npz", f"data.root={root}",
                             "model.name=nf_micro", f"model.trainable={trainable}",
                             f"model.trainable_stages={stages}", "privacy.noise_multiplier=1.0", "privacy.delta=1e-3",
                             "train.steps=2", "train.batch_size=32", "train.physical_batch_size=16",
                             "augmult.k=2", "optim.lr=0.5"])
    report = train(cfg, ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    torch.manual_seed(0)  # the run's init (train.seed=0)
    before = create_model("nf_micro", in_channels=3, num_classes=4)
    from safetensors.torch import load_file

    after = load_file(str(Path(report["run_dir"]) / "weights.safetensors"))
    changed = {n for n, p in before.state_dict().items() if not torch.equal(p, after[n])}
    expected = {"all": lambda n: True, "head": lambda n: n.startswith("head."),
                "stages": lambda n: n.startswith(("head.", "stages.3.", "final_conv."))}[trainable]
    assert changed and all(expected(n) for n in changed)
    if trainable != "all":
        assert not any(n.startswith("stem.") for n in changed)


def test_pretrained_weights_round_trip(tmp_path):
    torch.manual_seed(3)
    source = create_model("nf_micro_dm", in_channels=3, num_classes=7)
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_weights(source, tmp_path / "w.safetensors")
    loaded = create_model("nf_micro_dm", in_channels=3, num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    for (n, a), b in zip(source.state_dict().items(), loaded.state_dict().values()):
        if n.startswith("head."):
            assert b.abs().sum() == 0 and b.shape[0] == 3  # a new zero-init head for the new classes
        else:
            assert torch.equal(a, b), n


def test_weights_in_timm_naming_load_and_keep_the_function(tmp_path):
    raw = timm_tiny("nf_micro_eca").eval()
    raw_dm = timm_tiny("nf_micro_dm").eval()
    for name, model in (("nf_micro_eca", raw), ("nf_micro_dm", raw_dm)):
        torch.save(model.state_dict(), tmp_path / f"{name}.pth")  # timm's own keys (skipinit_gain, Conv1d)
        ready = create_model(name, in_channels=3, num_classes=4, pretrained=str(tmp_path / f"{name}.pth")).eval()
        with torch.no_grad():
            model.head.fc.weight.zero_()
            model.head.fc.bias.zero_()
            x = torch.randn(2, 3, 32, 32)
            assert torch.allclose(ready.forward_features(x), model.forward_features(x), atol=1e-5), name


def test_missing_or_unsafe_weights_are_refused(tmp_path):
    with pytest.raises(ModelError, match=r"model.pretrained='/nope/w.safetensors': no such file.*refusing a random"):
        create_model("nf_micro", in_channels=3, num_classes=2, pretrained="/nope/w.safetensors")
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"weight": object()}))  # weights_only refuses arbitrary objects
    with pytest.raises(ModelError, match="Cannot read pretrained weights"):
        create_model("nf_micro", in_channels=3, num_classes=2, pretrained=str(bad))
    other = create_model("nf_micro_dm", in_channels=3, num_classes=2)
    save_weights(other, tmp_path / "other.safetensors")
    with pytest.raises(ModelError, match="do not fit the model"):
        create_model("nf_micro", in_channels=3, num_classes=2, pretrained=str(tmp_path / "other.safetensors"))
    save_weights(create_model("nf_micro", in_channels=3, num_classes=2), tmp_path / "rgb.safetensors")
    with pytest.raises(ModelError, match=r"expect 3-channel images .* the data has 1 channel"):
        create_model("nf_micro", in_channels=1, num_classes=2, pretrained=str(tmp_path / "rgb.safetensors"))
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    for path, says in ((tmp_path, "is a folder, not a file"), (tmp_path / "dangling.safetensors", "broken link")):
        with pytest.raises(ModelError, match=says):
            create_model("nf_micro", in_channels=3, num_classes=2, pretrained=str(path))


def test_timm_cache_is_read_offline_and_its_absence_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"no timm/nf_regnet_b1.ra2_in1k/model.safetensors .* never downloads"):
        create_nf("nf_regnet_b1", num_classes=10, pretrained="cache")


def test_non_nf_and_unknown_models_are_refused():
    with pytest.raises(ModelError, match="not a normaliser-free model.*BatchNorm"):
        create_model("resnet18", in_channels=3, num_classes=10)
    with pytest.raises(ModelError, match="Unknown model .nfnet_zz."):
        create_model("nfnet_zz", in_channels=3, num_classes=10)
    with pytest.raises(ModelError, match="model.pretrained / model.trainable are for NF models"):
        create_model("cnn_small", in_channels=1, num_classes=10, trainable="head")


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"{IMAGENETTE} is absent (real images)")
def test_imagefolder_on_real_imagenet_layout():
    data = load_data(DataConfig(name="imagefolder", root=str(IMAGENETTE), image_size=32, val_size=100,
                                classes=[0, 3, 5, 7, 9]))
    assert isinstance(data.train.x, ImageFiles)  # decoded on demand, not held in memory
    assert data.train.x.shape == (400, 3, 32, 32) and data.val.x.shape == (100, 3, 32, 32)
    assert data.test.x.shape == (250, 3, 32, 32) and data.num_classes == 5
    assert torch.bincount(data.test.y).tolist() == [50] * 5
    batch = data.train.x[torch.tensor([0, 7, 399])]
    assert batch.shape == (3, 3, 32, 32) and batch.dtype == torch.uint8 and batch.float().std() > 10
    assert data.test.x[:2].shape == (2, 3, 32, 32) and data.train.x[torch.zeros(400, dtype=torch.bool)].shape[0] == 0


def test_imagefolder_bad_layouts(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="train"):  # class folders without images
        load_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16))
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(name="imagefolder", root=str(tmp_path / "none"), image_size=16))
    with pytest.raises(ConfigError, match="needs data.root .* and data.image_size"):
        DataConfig(name="imagefolder", root=str(tmp_path))


def test_class_subsets_and_upsampling():
    data = load_data(DataConfig(name="digits", classes=[5, 6, 7], image_size=16))
    assert data.num_classes == 3 and set(data.train.y.tolist()) == {0, 1, 2}
    assert data.train.x.shape[1:] == (1, 16, 16)
    with pytest.raises(DataError, match=r"labels \[12\] do not exist"):
        load_data(DataConfig(name="digits", classes=[1, 12]))


def test_non_private_training_only_on_public_data(tmp_path, capsys):
    led = tmp_path / "l.sqlite"
    common = ["--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}", "privacy.enabled=false",
              "train.steps=3", "train.batch_size=64"]
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), *common]) == 2
    assert "not marked public: a private dataset is only ever trained with DP" in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()
    assert main(["train", str(ROOT / "configs" / "quickstart.yaml"), *common, "data.public=true", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["private"] is False and report["epsilon"] is None
    assert ledger_snapshot(led) is None  # touches no ledger


@pytest.mark.parametrize("args, message", [
    (["model.name=nfnet_zz"], "Unknown model 'nfnet_zz'"),
    (["model.name=resnet18"], "not a normaliser-free model"),
    (["model.name=nf_micro", "model.pretrained=/nope.safetensors"], "no such file"),
    (["model.name=nf_micro", "model.film_members=2"], "NF models (timm's NF family, nf_micro*) have no normalisation"),
    (["model.name=cnn_small"], "dpwa finetune fine-tunes NF models"),
    (["model.name=nf_micro", "model.trainable=stages"], "trainable_stages >= 1"),
    (["model.name=nf_micro", "data.classes=[1,1]"], "data.classes must list at least 2 distinct labels"),
])
def test_bad_finetune_input_exits_2_without_charge(tmp_path, capsys, args, message):
    led = tmp_path / "l.sqlite"
    code = main(["finetune", str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "--ledger", str(led),
                 f"out_dir={tmp_path / 'runs'}", "data.image_size=32", "train.steps=2", *args])
    assert code == 2
    assert message in capsys.readouterr().err
    assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason=f"{IMAGENETTE} is absent (real images)")
def test_finetune_end_to_end_on_real_imagefolder(tmp_path, capsys):
    """`dpwa finetune` on the real ImageNet-layout folder: pretrained weights from a file, the
    last stage and head trained privately, one ledger charge, weights written for reuse."""
    torch.manual_seed(0)
    save_weights(create_model("nf_micro_eca", in_channels=3, num_classes=1000), tmp_path / "pre.safetensors")
    led = tmp_path / "l.sqlite"
    code = main(["finetune", str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "--ledger", str(led),
                 "--json", f"out_dir={tmp_path / 'runs'}", "data.name=imagefolder", f"data.root={IMAGENETTE}",
                 "data.image_size=32", "data.ledger_name=imagenette-small", "model.name=nf_micro_eca",
                 f"model.pretrained={tmp_path / 'pre.safetensors'}", "model.trainable=stages",
                 "model.trainable_stages=1", "train.steps=3", "train.batch_size=64", "train.physical_batch_size=32",
                 "augmult.k=2", "augmult.pad=4", "augmult.flip=true", "privacy.delta=1e-4"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 3 and report["sample_rate"] == pytest.approx(64 / 1000)
    (run,) = Ledger(led).runs()
    assert run.status == "committed" and run.dataset == "imagenette-small"
    assert (Path(report["run_dir"]) / "weights.safetensors").is_file()


def test_finetuning_from_a_run_folders_weights_carries_that_runs_releases(tmp_path, capsys, monkeypatch):
    """model.pretrained inside a run folder (directly, through a link, or through a public run
    that started from it): the ledger must hold every charged run it carries, whatever the
    dataset's name, and one that was not private (a seeded test run) makes the fine-tuned run
    not private, on resume too, wherever the weights have gone (a copy's file records them)."""
    led = tmp_path / "l.sqlite"
    common = [str(ROOT / "configs" / "quickstart.yaml"), "--no-progress", "--json", "data.image_size=32",
              "model.name=nf_micro", "train.steps=2", "train.batch_size=64", "train.physical_batch_size=64",
              "augmult.k=1"]

    def run(verb, *extra, ledger=led):
        code = main([verb, *common, "--ledger", str(ledger), f"out_dir={tmp_path / 'runs'}", *extra])
        out = capsys.readouterr()
        return code, (json.loads(out.out) if code == 0 else out.err)

    def weights(report):
        return Path(report["run_dir"]) / "weights.safetensors"

    _, seeded = run("train", "privacy.noise_seed=5", "data.ledger_name=digits-a")  # another name, one dataset
    _, private = run("train")
    link = tmp_path / "best.safetensors"
    link.symlink_to(weights(seeded))
    _, public = run("train", "privacy.enabled=false", "data.public=true", f"model.pretrained={link}")
    for start, want in ((seeded, False), (link, False), (public, False), (private, True)):
        code, report = run("finetune", f"model.pretrained={start if isinstance(start, Path) else weights(start)}")
        assert code == 0 and report["private"] is want, start
    assert [r["run_id"] for r in json.loads((Path(report["run_dir"]) / "run.json").read_text())["built_on"]] == [
        private["run_id"]]
    code, dry = run("finetune", f"model.pretrained={weights(public)}", "--dry-run")
    assert code == 0 and dry["private"] is False
    assert [r["run_id"] for r in dry["built_on"]] == [public["run_id"], seeded["run_id"]]
    # a public run from before run.json listed what it carried: its config's model.pretrained is followed
    meta = json.loads((Path(public["run_dir"]) / "run.json").read_text())
    (Path(public["run_dir"]) / "run.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "built_on"}))
    code, report = run("finetune", f"model.pretrained={weights(public)}")
    assert code == 0 and report["private"] is False
    # a curve between two fine-tuned runs takes every weight from them, none from a file
    from dpwa.connectivity import curve_config
    from dpwa.methods.curve import check_endpoints

    _, tuned = run("finetune", f"model.pretrained={weights(private)}")
    for end in (tuned, report):
        text = (Path(end["run_dir"]) / "config.yaml").read_text()
        (Path(end["run_dir"]) / "config.yaml").write_text(text.replace(str(tmp_path) + "/", ""))  # as before: relative
    curve = curve_config(Path(tuned["run_dir"]), Path(report["run_dir"]), overrides=["train.steps=2"])
    assert curve.model.pretrained is None and len(check_endpoints(curve)) == 2
    snapshot = ledger_snapshot(led)
    for start in (private, public):  # the public run carries the seeded one, charged to `led`
        code, err = run("finetune", f"model.pretrained={weights(start)}", ledger=tmp_path / "other.sqlite")
        assert code == 2 and "is not in ledger" in err and ledger_snapshot(led) == snapshot
    assert not (tmp_path / "other.sqlite").exists()
    # stopped, the seeded run's folder gone, resumed from elsewhere: still not private
    monkeypatch.chdir(Path(seeded["run_dir"]).parent)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        *common[3:], f"model.pretrained={Path(seeded['run_dir']).name}/weights.safetensors", "train.steps=3",
        "train.checkpoint_every=1", f"out_dir={tmp_path / 'runs'}"])
    assert cfg.model.pretrained == str(weights(seeded))  # stored absolute
    stopped = train(cfg, ledger_path=str(led), progress=False, stop_after=1)
    import shutil

    shutil.rmtree(seeded["run_dir"])
    monkeypatch.chdir(tmp_path)
    assert train(resume=Path(stopped["run_dir"]), ledger_path=str(led), progress=False)["private"] is False
    # weights copied out of their run folder carry its runs in the file (weights and checkpoint alike)
    from safetensors.torch import load_file, save_file

    from dpwa.run_folder import CARRIED

    for source, name, want in ((stopped, "checkpoint.pt", False), (public, "weights.safetensors", False),
                               (private, "weights.safetensors", True)):
        copied = tmp_path / f"copied-{name}"
        copied.write_bytes((Path(source["run_dir"]) / name).read_bytes())
        code, report = run("finetune", f"model.pretrained={copied}")
        assert code == 0 and report["private"] is want, (source["run_id"], name)
        carried = [r["run_id"] for r in json.loads((Path(report["run_dir"]) / "run.json").read_text())["built_on"]]
        assert carried == [source["run_id"], *([seeded["run_id"]] if source is not private else [])]
    snapshot = ledger_snapshot(led)
    code, err = run("finetune", f"model.pretrained={copied}", ledger=tmp_path / "other.sqlite")
    assert code == 2 and "is not in ledger" in err and ledger_snapshot(led) == snapshot
    # a dpwa checkpoint copied out from before checkpoints recorded them, or a record not dpwa's: refused
    old = torch.load(Path(stopped["run_dir"]) / "checkpoint.pt", weights_only=True)
    torch.save({k: v for k, v in old.items() if k != CARRIED}, tmp_path / "old-checkpoint.pt")
    save_file(load_file(weights(public)), tmp_path / "forged.safetensors", metadata={CARRIED: '[{"run_id": 1}]'})
    for bad, says in (("old-checkpoint.pt", "outside its run folder"), ("forged.safetensors", "not written by dpwa")):
        code, err = run("finetune", f"model.pretrained={tmp_path / bad}")
        assert code == 2 and says in err and bad in err and ledger_snapshot(led) == snapshot, err
    # weights with no record (re-saved without it: from outside dpwa) are taken as public weights
    save_file(load_file(weights(public)), tmp_path / "stripped.safetensors")
    code, report = run("finetune", f"model.pretrained={tmp_path / 'stripped.safetensors'}")
    assert code == 0 and report["private"] is True


@pytest.mark.parametrize("kw", [{"groups": 3}, {"weight_standardization": False}])
def test_groupnorm_and_ws_settings_on_an_nf_model_are_warned_of_not_ignored(kw):
    """An NF model has neither GroupNorm nor a WS switch: model.groups=3 built the same model
    in silence (design: an intent typed wrong is not ignored)."""
    from dpwa.models import create_model

    key, value = next(iter(kw.items()))
    with pytest.warns(UserWarning, match=rf"model.{key}={value} has no effect on this model"):
        create_model("nf_micro", in_channels=3, num_classes=5, **kw)
