"""Channels-last models and inputs (`model.to(memory_format=torch.channels_last)`, which
users do for speed) against the loop over single examples. dpwa's engines read activations
and output gradients by shape, never by strides, and are exact either way. Opacus 1.6.0's
hook-based conv rule is wrong on channels-last activations; the mechanism hands engines
contiguous inputs (`test_engines.test_noised_update_matches_reference`), and a model whose
own weights are channels-last (so its later activations are too) is refused by the probe
before any private data is read."""

import pytest
import torch
import torch.nn as nn

from dpwa.engines import FastEngine, make_engine
from dpwa.privacy import PrivateSGD
from dpwa.probe import ProbeError

from .test_engines import MODELS, assert_sums_close, channels_last_views, clip_and_add, make_inputs, \
    reference_case


@pytest.mark.parametrize("engine, mode", [("dpwa-fast", "auto"), ("dpwa-fast", "ghost"),
                                          ("dpwa-fast", "instantiate"), ("dpwa-lean", None)])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_dpwa_engines_are_exact_on_channels_last(model_name, engine, mode):
    state, views, labels, names, grads, want_norms = reference_case(model_name, 3)
    model = MODELS[model_name][0]().double()
    model.load_state_dict(state)
    model = model.to(memory_format=torch.channels_last)
    views = channels_last_views(views)
    assert views.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    by_name = dict(model.named_parameters())
    clip = float(want_norms.median())
    want = clip_and_add([by_name[n] for n in names], grads, want_norms, clip)
    eng = FastEngine(model, mode=mode) if mode else make_engine(engine, model)
    got, _, norms = eng.clipped_sum(views, labels, clip)
    eng.remove()
    assert torch.allclose(norms, want_norms, rtol=1e-5, atol=1e-12)
    assert_sums_close(got, want)


def two_convs():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(3, 6), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.Tanh(), nn.Flatten(), nn.Linear(6 * 8 * 8, 5)).double()


def assert_refused_unchanged(sgd, views, labels, released):
    before = {n: p.clone() for n, p in sgd.model.named_parameters()}
    with pytest.raises(ProbeError, match=r"privacy.engine=opacus-hooks is not exact on this model.*3.weight"):
        sgd.step([(views, labels)])
    assert sgd.mechanism.released == released
    assert all(torch.equal(p, before[n]) for n, p in sgd.model.named_parameters())


def test_probe_refuses_opacus_hooks_on_a_channels_last_model():
    """The probe's float64 copy keeps the weights' layout, so it meets the channels-last
    activations training would, and names the engine and the wrong parameter (the second
    conv: the first one's input is contiguous); nothing is released and the model is unchanged."""
    torch.manual_seed(0)
    model = two_convs().to(memory_format=torch.channels_last)
    views, labels = make_inputs(1, 3)
    sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip_norm=1.0,
                     expected_batch_size=5, engine="opacus-hooks", releases=2)
    assert_refused_unchanged(sgd, views, labels, released=0)


def test_a_model_moved_to_channels_last_after_its_probe_is_probed_again():
    torch.manual_seed(0)
    model = two_convs()
    views, labels = make_inputs(1, 3)
    sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip_norm=1.0,
                     expected_batch_size=5, engine="opacus-hooks", releases=3)
    sgd.step([(views, labels)])  # contiguous: Opacus is exact, the probe passes
    model.to(memory_format=torch.channels_last)
    assert_refused_unchanged(sgd, views, labels, released=1)
