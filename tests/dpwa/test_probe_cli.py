"""The probe runs before the reservation for models registered by a user: a model that mixes
examples, or an engine that is not exact on it, is refused by `dpwa train` with exit 2 and a
message naming the module or parameter; the ledger is unchanged and no run folder is made.
Where the engine handles the model (a declared tiling, 0-dim gains), the run trains.
(`tests/dpwa/test_probe.py` drives `dpwa.probe` directly over every case and engine.)"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from accounting import Ledger
from dpwa.cli import main
from dpwa.models import MODELS, register_model
from dpwa.rows import Tiling
from tests.conftest import ROOT, ledger_snapshot

QUICK = ROOT / "configs" / "quickstart.yaml"


class MeanSub(nn.Module):
    def forward(self, x):
        return x - x.mean(0, keepdim=True)


class MixesOnlyIn(nn.Module):
    """Mixes examples only in eval mode, or only in batches larger than the probe's 4."""

    def __init__(self, when):
        super().__init__()
        self.when = when

    def forward(self, x):
        mix = (not self.training) if self.when == "eval" else x.shape[0] > 8
        return x - x.mean(0, keepdim=True) if mix else x


class RunningMean(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mu", torch.zeros(64))

    def forward(self, x):
        if self.training:
            self.mu.mul_(0.9).add_(0.1 * x.detach().mean(0))  # a statistic of the private batch
        return x


class TiedHead(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.a = nn.Linear(c, 10)
        self.b = nn.Linear(c, 10)
        self.b.weight = self.a.weight  # one Parameter in two layers

    def forward(self, x):
        return self.a(x) + self.b(x)


class Members(nn.Module):
    """Two members over a member-major tiled batch (x.repeat(M, ...)), as FiLM-Ensemble does."""

    def __init__(self, c):
        super().__init__()
        self.body = nn.Linear(c, 10)
        self.gain = nn.Parameter(torch.ones(2, 1))

    def forward(self, x):
        b = x.shape[0]
        out = self.body(x.repeat(2, 1))                # member-major rows
        return out * self.gain.repeat_interleave(b, 0)


class Gains(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.fc = nn.Linear(c, 10)
        self.skip_gain = nn.Parameter(torch.tensor(0.5))  # 0-dim, as NF-ResNets' skip-init gains

    def forward(self, x):
        return self.fc(x) * self.skip_gain


def _flat(*layers):
    return lambda *, in_channels, num_classes, groups, weight_standardization: nn.Sequential(
        nn.Flatten(), *layers)


def _tiled(order):
    """The model (the top-level module) declares its tiling, or not."""
    def build(**kwargs):
        model = nn.Sequential(nn.Flatten(), Members(64))
        if order is not None:
            model.dpwa_tiling = Tiling(members=2, order=order)
        return model
    return build


CASES = {  # model name: (module factory, engine, expected: None (trains) or a message fragment)
    "probe_bn_affine_false": (lambda **k: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, affine=False),
                                                       nn.Flatten(), nn.Linear(144, 10)), "dpwa-fast", "1"),
    "probe_batch_mean": (_flat(MeanSub(), nn.Linear(64, 10)), "torch-func", "mixes"),
    "probe_reflect_ghost": (lambda **k: nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"),
                                                     nn.Flatten(), nn.Linear(256, 10)), "opacus-ghost", "0"),
    "probe_tied": (_flat(TiedHead(64)), "dpwa-fast", "weight"),
    "probe_undeclared_tiling": (_tiled(None), "torch-func", "dpwa_tiling"),
    "probe_misdeclared_tiling": (_tiled("example-major"), "torch-func", "mixes"),
    "probe_declared_tiling": (_tiled("member-major"), "torch-func", None),
    "probe_gains_torch_func": (_flat(Gains(64)), "torch-func", None),
    # trains in training mode, where it does not mix, but a charged validation accuracy (here, or
    # `dpwa eval --data val` later) and a landscape's loss query run it in eval mode on private data
    "probe_mixes_in_eval_only": (lambda **k: nn.Sequential(nn.Flatten(), MixesOnlyIn("eval"),
                                                          nn.Linear(64, 10)).eval(), "dpwa-fast",
                                 "mixes examples in evaluation mode"),
    "probe_mixes_in_big_batches": (_flat(MixesOnlyIn("big"), nn.Linear(64, 10)), "dpwa-fast", "mixes examples in a batch of"),
    "probe_running_statistic": (_flat(RunningMean(), nn.Linear(64, 10)), "dpwa-fast", "1.mu"),
    "probe_gains_opacus": (_flat(Gains(64)), "opacus-functorch", None),
}


@pytest.fixture(scope="module", autouse=True)
def registered():
    for name, (factory, _, _) in CASES.items():
        register_model(name)(lambda *, factory=factory, **kw: factory(**kw))
    yield
    for name in CASES:
        del MODELS[name]


@pytest.mark.parametrize("name", list(CASES))
def test_registered_models_are_probed_before_the_reservation(tmp_path, capsys, name):
    _, engine, expected = CASES[name]
    led = tmp_path / "l.sqlite"
    Ledger(led).set_budget("digits", epsilon=10.0, delta=1e-4)
    before = ledger_snapshot(led)
    code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                 f"model.name={name}", f"privacy.engine={engine}", "train.steps=3", "train.batch_size=64",
                 "augmult.k=1"])
    err = capsys.readouterr().err
    if expected is None:
        assert code == 0, err
        return
    assert code == 2, err
    assert expected in err and "Traceback" not in err
    assert ledger_snapshot(led) == before and not (tmp_path / "runs").exists()


def test_f_batch_norm_in_forward_is_refused(tmp_path, capsys):
    class FBN(nn.Module):
        def forward(self, x):
            return F.batch_norm(x, None, None, training=True)

    register_model("probe_f_batch_norm")(_flat(FBN(), nn.Linear(64, 10)))
    try:
        led = tmp_path / "l.sqlite"
        code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                     "model.name=probe_f_batch_norm", "train.steps=3", "train.batch_size=64", "augmult.k=1"])
        assert code == 2 and "mixes" in capsys.readouterr().err
        assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()
    finally:
        del MODELS["probe_f_batch_norm"]


def test_the_probe_runs_on_the_training_splits_shape(tmp_path, capsys):
    """The private examples are the training split's: a model that mixes examples only at its
    size (16x16; the public test split is 8x8) is refused before the reservation."""
    from dpwa.data import SOURCES, Split, register_source

    class MixesAt16(nn.Module):
        def forward(self, x):
            return x - x.mean(0, keepdim=True) if x.shape[-1] == 16 else x

    @register_source("probe-shapes")
    def _source(cfg):
        g = torch.Generator().manual_seed(0)
        train = Split(torch.randint(0, 256, (300, 1, 16, 16), generator=g, dtype=torch.uint8), torch.arange(300) % 10)
        test = Split(torch.randint(0, 256, (50, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(50) % 10)
        return train, test, 10

    register_model("probe_mixes_at_16")(lambda **kw: nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), MixesAt16(), nn.Tanh(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 10)))
    try:
        led = tmp_path / "l.sqlite"
        code = main(["train", str(QUICK), "--no-progress", "--ledger", str(led), f"out_dir={tmp_path / 'runs'}",
                     "data.name=probe-shapes", "model.name=probe_mixes_at_16", "train.steps=3", "train.batch_size=64",
                     "augmult.k=1"])
        err = capsys.readouterr().err
        assert code == 2 and "mixes" in err, err
        assert ledger_snapshot(led) is None and not (tmp_path / "runs").exists()
    finally:
        del MODELS["probe_mixes_at_16"], SOURCES["probe-shapes"]
