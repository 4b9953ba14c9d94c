"""FiLM-Ensemble (dpwa.models.film): per-example gradients of M members x K views against a
float64 loop over single examples, the members as modulated copies of one network, the
config's refusals, member-averaged evaluation with disagreement, and kill-and-resume with
one ledger charge. The audit's per-copy clipping bug is in tests/audit/test_planted_bugs.py."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from accounting import Ledger
from dpwa.cli import main
from dpwa.config import ConfigError, load_config
from dpwa.engines import make_engine
from dpwa.evaluate import member_metrics
from dpwa.models import ModelError, create_model
from dpwa.models.film import FiLM, FiLMEnsemble, film_ensemble
from dpwa.models.wrn import WideResNet
from dpwa.rows import Tiling
from dpwa.train import train
from tests.dpwa.test_train import final_weights, tiny


def wrn_film():
    torch.manual_seed(0)
    m = WideResNet(10, 1, in_channels=3, num_classes=5, groups=4)
    nn.init.normal_(m.head.weight, std=0.1)  # the zero-init head would zero most gradients
    return film_ensemble(m, 2, gain=1.0)


MODELS = {
    "cnn_tanh_ws_m3": (lambda: create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4,
                                            weight_standardization=True, film_members=3), 3, 2),
    "scatter_cnn_m4": (lambda: create_model("scatter_cnn", in_channels=18, num_classes=5, groups=9, conv_norm=True,
                                            film_members=4, film_gain=0.5), 18, 1),
    "wrn10_1_m2": (wrn_film, 3, 2),
}


def loop(model, views, labels, clip_norm):
    """Each example alone, float64: the gradient of the mean cross-entropy over all its rows
    (K views x M members), its norm, clipped, summed."""
    params = [p for p in model.parameters() if p.requires_grad]
    total, norms = [torch.zeros_like(p) for p in params], []
    for x, y in zip(views, labels):
        out = model(x)
        grads = torch.autograd.grad(F.cross_entropy(out, y.expand(out.shape[0])), params)
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        factor = min(1.0, clip_norm / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
        norms.append(norm)
    return dict(zip(params, total)), torch.stack(norms)


@pytest.mark.parametrize("engine", ["dpwa-fast", "dpwa-lean", "torch-func"])
@pytest.mark.parametrize("name", list(MODELS))
def test_per_example_gradients_of_members_and_views_match_the_loop(name, engine):
    make, channels, k = MODELS[name]
    torch.manual_seed(1)
    model = make().double()
    g = torch.Generator().manual_seed(2)
    views = torch.randn(5, k, channels, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (5,), generator=g)
    want, want_norms = loop(model, views, labels, clip_norm=1e9)
    clip = float(want_norms.median())  # half the examples clipped
    want, _ = loop(model, views, labels, clip_norm=clip)
    eng = make_engine(engine, model)
    try:
        got, _, norms = eng.clipped_sum(views, labels, clip)
    finally:
        if hasattr(eng, "remove"):
            eng.remove()
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)
    for p, w in want.items():
        assert (got[p] - w).abs().max() <= 1e-5 * w.abs().max() + 1e-12, tuple(w.shape)
    films = [m for m in model.modules() if isinstance(m, FiLM)]
    assert films and all(got[f.gamma].abs().sum() > 0 for f in films)  # every member's scales are trained


def test_opacus_hooks_refuses_a_tiled_model_by_name():
    model = MODELS["cnn_tanh_ws_m3"][0]().double()
    eng = make_engine("opacus-hooks", model)
    with pytest.raises(Exception, match="cannot fold the 3 members.*dpwa-fast or torch-func"):
        eng.clipped_sum(torch.randn(2, 1, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1]), 1.0)


def test_members_are_modulated_copies_of_one_network():
    """Row b * M + m of the output is the plain network with member m's gamma / beta in place
    of GroupNorm's affine; at gain 0 every member is the plain network at its initialisation."""
    torch.manual_seed(0)
    plain = create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4, weight_standardization=False)
    torch.manual_seed(0)
    ens = create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4, weight_standardization=False,
                       film_members=3, film_gain=1.0)
    assert isinstance(ens, FiLMEnsemble) and ens.dpwa_tiling == Tiling(members=3, order="example-major")
    x = torch.randn(4, 3, 8, 8)
    out = ens(x).view(4, 3, 5)
    films = [m for m in ens.modules() if isinstance(m, FiLM)]
    assert len(films) == len([m for m in plain.modules() if isinstance(m, nn.GroupNorm)]) == 6
    shared = {k: v for k, v in ens.body.state_dict().items() if not k.endswith(("gamma", "beta"))}
    for member in range(3):
        copy = create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4, weight_standardization=False)
        missing = copy.load_state_dict(shared, strict=False).missing_keys  # convs and the head, shared
        assert len(missing) == 12  # the 6 GroupNorms' weight and bias
        for norm, film in zip([m for m in copy.modules() if isinstance(m, nn.GroupNorm)], films):
            norm.weight.data.copy_(film.gamma[member])
            norm.bias.data.copy_(film.beta[member])
        torch.testing.assert_close(out[:, member], copy(x), rtol=1e-5, atol=1e-6)
    assert (out[:, 0] - out[:, 1]).abs().max() > 1e-3  # the diversity initialisation
    torch.manual_seed(0)
    same = create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4, weight_standardization=False,
                        film_members=3, film_gain=0.0)
    same_out = same(x).view(4, 3, 5)
    torch.testing.assert_close(same_out[:, 0], same_out[:, 2])
    torch.testing.assert_close(same_out[:, 0], plain(x), rtol=1e-5, atol=1e-6)


def test_film_config_is_checked():
    with pytest.raises(ConfigError, match="model.film_members must be 0 .* or >= 2, got 1"):
        load_config(None, ["model.film_members=1", "privacy.epsilon=1", "train.steps=2"])
    with pytest.raises(ModelError, match="no affine GroupNorm.*model.conv_norm=true"):
        create_model("scatter_cnn", in_channels=18, num_classes=5, groups=9, film_members=2)
    with pytest.raises(ModelError, match="model.conv_norm=true is for scatter_cnn"):
        create_model("cnn_tanh", in_channels=3, num_classes=5, groups=4, conv_norm=True)
    with pytest.raises(ValueError, match="not a multiple"):
        FiLM(4, 3)(torch.randn(4, 4, 2, 2))


def test_member_metrics_count_pairwise_disagreement():
    labels = torch.tensor([0, 1, 2, 0])
    eye = torch.eye(3)
    per_member = torch.stack([eye[[0, 1, 2, 0]], eye[[0, 1, 2, 1]], eye[[0, 2, 2, 1]]])  # (M=3, N=4, C=3)
    m = member_metrics(per_member, labels)
    # pairs: (0,1) differ on 1 of 4, (0,2) on 2, (1,2) on 1 -> mean 4/12
    assert m["member_disagreement"] == pytest.approx(4 / 12)
    assert m["member_accuracy"] == pytest.approx((4 + 3 + 2) / 12)
    assert member_metrics(per_member[:1], labels) == {}


FILM = ["model.film_members=3", "model.film_gain=0.5"]


def test_film_runs_charge_one_model_evaluate_by_member_and_resume_exactly(tmp_path, capsys):
    led_a, led_d, led_b = (str(tmp_path / f"{n}.sqlite") for n in "adb")
    dense = train(tiny(tmp_path / "d"), ledger_path=led_d, progress=False)
    full = train(tiny(tmp_path / "a", *FILM), ledger_path=led_a, progress=False)
    assert full["releases"] == dense["releases"] and full["epsilon"] == dense["epsilon"]
    assert Ledger(led_a).run(full["run_id"]).spent == Ledger(led_d).run(dense["run_id"]).spent
    assert 0 <= full["test_raw"]["member_disagreement"] <= 1 and "member_accuracy" in full["test_raw"]
    assert "member_disagreement" not in dense["test_raw"]
    assert main(["eval", full["run_dir"]]) == 0
    out = capsys.readouterr().out
    assert "disagree" in out and "FiLM-Ensemble" in out
    saved = json.loads((Path(full["run_dir"]) / "eval.json").read_text())
    assert saved["methods"]["raw"]["member_disagreement"] == pytest.approx(full["test_raw"]["member_disagreement"])
    stopped = train(tiny(tmp_path / "b", *FILM), ledger_path=led_b, progress=False, stop_after=6)
    assert final_weights(stopped["run_dir"])["step"] == 4
    resumed = train(resume=Path(stopped["run_dir"]), ledger_path=led_b, progress=False)
    a, b = final_weights(full["run_dir"]), final_weights(resumed["run_dir"])
    assert any("gamma" in key for key in a["model"])
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    (run,) = Ledger(led_b).runs()
    assert run.status == "committed" and run.spent == Ledger(led_a).run(full["run_id"]).spent
