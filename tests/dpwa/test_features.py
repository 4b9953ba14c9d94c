"""ScatterNet features: shape, a per-image (batch-independent) transform, and training on them."""

from pathlib import Path

import pytest
import torch

from dpwa.features import feature_shape, scattering
from dpwa.train import train
from tests.dpwa.test_train import tiny


def test_shape_and_per_image():
    x = torch.rand(3, 3, 16, 16)
    out = scattering(x, batch_size=2)
    assert out.shape == (3, *feature_shape(3, 16, 16)) == (3, 243, 4, 4)
    # Each image's features depend on that image only (no statistics across the batch).
    assert torch.allclose(out[1:2], scattering(x[1:2]), atol=1e-6)
    assert torch.allclose(scattering(torch.cat([x[:1], torch.zeros(1, 3, 16, 16)]))[0], out[0], atol=1e-6)
    assert out[0, 0].mean() > 0  # the order-0 coefficient is a low-pass of a positive image


def test_training_on_scattering_features(tmp_path):
    cfg = tiny(tmp_path, "data.features=scattering", "model.name=scatter_cnn", "model.groups=9", "augmult.k=1",
               "train.steps=30", "train.batch_size=256", "train.physical_batch_size=256", "optim.lr=2")
    report = train(cfg, ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    print(report["test_ema"])
    assert report["augmult_k"] == 1 and report["test_ema"]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert "features: scattering" in (tmp_path / "runs" / report["run_id"] / "config.yaml").read_text()


def test_features_refuse_augmult():
    from dpwa.config import ConfigError

    with pytest.raises(ConfigError, match="augmult.k=2 with data.features=scattering"):
        tiny(Path("/tmp"), "data.features=scattering", "augmult.k=2")


def test_test_time_flip_averages_the_mirror_images_softmax():
    """data.test_time_flip: a val / test prediction is the mean softmax of the image and its
    mirror image (features: of the mirrored image's features), against a loop over single
    examples in float64; the training split is never mirrored."""
    import copy
    import dataclasses

    from dpwa.config import DataConfig
    from dpwa.data import load_data
    from dpwa.evaluate import predict_proba

    for features, model in (("none", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))),
                            ("scattering", torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(81 * 4, 10)))):
        cfg = DataConfig(name="digits", val_size=50, features=features, test_time_flip=True)
        flip, plain = load_data(cfg), load_data(dataclasses.replace(cfg, test_time_flip=False))
        torch.manual_seed(0)
        reference = copy.deepcopy(model).double()
        for name in ("test", "val"):
            got = predict_proba([model], getattr(flip, name), flip)
            raw = getattr(plain, name).x
            for i in (0, 7):
                image = raw[i:i + 1]
                if features == "none":
                    views = [plain.normalize(image), plain.normalize(image.flip(-1))]
                else:  # the features of the mirrored uint8 image, as the scattering of its normalised pixels
                    pixels = load_data(dataclasses.replace(cfg, features="none"))
                    source = getattr(pixels, name).x[i:i + 1]
                    views = [scattering(pixels.normalize(source)), scattering(pixels.normalize(source.flip(-1)))]
                    assert torch.allclose(views[0], image, atol=1e-5)
                want = sum(reference(v.double()).softmax(-1) for v in views) / 2
                assert torch.allclose(got[i].double(), want[0], atol=1e-5), (features, name, i)
            assert not torch.allclose(got, predict_proba([model], getattr(plain, name), plain), atol=1e-4)
        assert flip.train.mirror is None and flip.mirrored(flip.train, flip.train.x[:2], 0) is None


def test_dpwa_eval_test_time_flip_overrides_the_runs_choice(tmp_path):
    """`dpwa eval --test-time-flip` on a run trained without it: every prediction is the mean
    softmax of the image and its mirror image (against a float64 loop over single examples);
    without the flag the run's own choice (off) stands, and nothing else of the run changes."""
    import json
    import shutil

    from dpwa.cli import main
    from dpwa.run_folder import load_run

    run_dir = tmp_path / "run"
    shutil.copytree(Path(__file__).parent.parent / "fixtures" / "prechange_run", run_dir)
    outs = {}
    for flag in ([], ["--test-time-flip"]):
        assert main(["eval", str(run_dir), "--methods", "raw", "--json", *flag]) == 0
        outs[bool(flag)] = json.loads((run_dir / "eval.json").read_text())
    assert outs[True]["test_time_flip"] and not outs[False]["test_time_flip"]
    run = load_run(run_dir)
    assert not run.cfg.data.test_time_flip  # the run folder is untouched
    model, test = run.model.double().eval(), run.data.test
    nll = 0.0
    with torch.no_grad():
        for i in range(len(test)):
            image = test.x[i:i + 1]
            p = (model(run.data.normalize(image).double()).softmax(-1)
                 + model(run.data.normalize(image.flip(-1)).double()).softmax(-1)) / 2
            nll -= p[0, int(test.y[i])].log().item()
    assert outs[True]["methods"]["raw"]["nll"] == pytest.approx(nll / len(test), rel=1e-4)
    assert outs[False]["methods"]["raw"]["nll"] != pytest.approx(nll / len(test), rel=1e-3)
