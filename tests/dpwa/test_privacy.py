"""DP-SGD against slow, obviously correct references (loops over single examples)."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dpwa.models import ModelError, check_dp_compatible, create_model
from dpwa.models.wrn import WideResNet
from dpwa.models.ws import WSConv2d, standardize
from dpwa.engines.reference import per_example_grads
from dpwa.privacy import PrivateSGD, poisson_batches, secret_generator


def reference_grads(model, views, labels):
    """Loop: for each example, the gradient of the mean loss over its K views."""
    out = {n: [] for n, _ in model.named_parameters()}
    for x, y in zip(views, labels):
        model.zero_grad()
        F.cross_entropy(model(x), y.expand(len(x))).backward()
        for n, p in model.named_parameters():
            out[n].append(p.grad.clone())
    return {n: torch.stack(v) for n, v in out.items()}


def assert_close(got, want, rtol=1e-5):
    for n in want:
        scale = want[n].abs().max().clamp_min(1e-12)
        assert (got[n] - want[n]).abs().max() <= rtol * scale + 1e-7, n


MODELS = [
    ("cnn_small_ws_gn", lambda: create_model("cnn_small", in_channels=1, num_classes=10, groups=4)),
    ("cnn_tanh_ws", lambda: create_model("cnn_tanh", in_channels=1, num_classes=10, groups=4,
                                         weight_standardization=True)),
    ("wrn10_1_ws_gn", lambda: WideResNet(10, 1, in_channels=1, num_classes=10, groups=4)),
]


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("name, build", MODELS, ids=[m[0] for m in MODELS])
def test_per_example_grads_match_single_example_loop(name, build, k):
    torch.manual_seed(0)
    model = build()
    if isinstance(model, WideResNet):  # zero-init head makes most grads zero; perturb it
        nn.init.normal_(model.head.weight, std=0.1)
    views, labels = torch.randn(5, k, 1, 8, 8), torch.randint(0, 10, (5,))
    got, losses = per_example_grads(model, views, labels)
    assert_close(got, reference_grads(model, views, labels))
    assert losses.shape == (5,)


def test_ws_gradient_is_with_respect_to_the_raw_weight():
    torch.manual_seed(0)
    conv = WSConv2d(2, 3, kernel_size=3, padding=1)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 16, 4))
    views, labels = torch.randn(3, 1, 2, 4, 4), torch.randint(0, 4, (3,))
    got, _ = per_example_grads(model, views, labels)
    # Reference by hand: gradient w.r.t. the standardised weight, pulled back through
    # standardize by autograd, for example 0.
    w = conv.weight.detach().clone().requires_grad_(True)
    w_hat = standardize(w, conv.eps)
    w_hat_leaf = w_hat.detach().requires_grad_(True)
    out = model[2](model[1](F.conv2d(views[0], w_hat_leaf, conv.bias, padding=1)))
    F.cross_entropy(out, labels[0].expand(1)).backward()
    (raw,) = torch.autograd.grad(w_hat, w, w_hat_leaf.grad)
    assert torch.allclose(got["0.weight"][0], raw, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got["0.weight"][0], w_hat_leaf.grad, rtol=1e-2)  # the test can tell them apart


def test_augmult_k1_equals_plain_per_example_gradients():
    torch.manual_seed(0)
    model = create_model("cnn_small", in_channels=1, num_classes=10, groups=4)
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    got, _ = per_example_grads(model, x[:, None], y)
    for i in range(4):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in model.named_parameters():
            assert torch.allclose(got[n][i], p.grad, rtol=1e-5, atol=1e-7)


def test_no_noise_no_clipping_equals_plain_sgd():
    torch.manual_seed(0)
    model = create_model("cnn_small", in_channels=1, num_classes=10, groups=4)
    plain = copy.deepcopy(model)
    views, labels = torch.randn(6, 2, 1, 8, 8), torch.randint(0, 10, (6,))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sgd = PrivateSGD(model, opt, noise_multiplier=0.0, clip_norm=1e12, expected_batch_size=6)
    sgd.step([(views[:4], labels[:4]), (views[4:], labels[4:])])  # two physical chunks
    popt = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    loss = sum(F.cross_entropy(plain(v), y.expand(len(v))) for v, y in zip(views, labels)) / 6
    loss.backward()
    popt.step()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("rescale", [False, True])
def test_each_example_moves_the_weights_by_at_most_lr_times_c(k, rescale):
    """One example per step, no noise, SGD lr 1, B = 1: the update is the clipped gradient
    (over C if rescaled), so its norm is <= C; augmult views are clipped once, not K times."""
    torch.manual_seed(0)
    c = 0.05
    for i in range(4):
        model = create_model("cnn_small", in_channels=1, num_classes=10, groups=4)
        before = torch.cat([p.detach().flatten() for p in model.parameters()])
        sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=0.0, clip_norm=c,
                         expected_batch_size=1, rescale_to_unit=rescale)
        views, labels = 3 * torch.randn(1, k, 1, 8, 8), torch.randint(0, 10, (1,))
        sgd.step([(views, labels)])
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        bound = 1.0 if rescale else c
        assert (after - before).norm() <= bound * (1 + 1e-4)
        assert (after - before).norm() >= 0.99 * bound  # the raw gradient is far above C


def test_noise_std_is_sigma_c_over_b():
    """Zero gradients (empty batches): the update is pure noise with std lr * sigma * C / B."""
    model = nn.Linear(50, 20)
    sigma, c, b, lr = 2.0, 0.5, 10.0, 1.0
    sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=lr), noise_multiplier=sigma, clip_norm=c,
                     expected_batch_size=b, generator=secret_generator(123))
    deltas = []
    for _ in range(20):
        before = model.weight.detach().clone()
        sgd.step([])
        deltas.append((model.weight.detach() - before).flatten())
    std = torch.cat(deltas).std().item()
    assert std == pytest.approx(lr * sigma * c / b, rel=0.03)  # 20k samples: ~0.5% standard error


def test_poisson_sampling_rate():
    gen = torch.Generator().manual_seed(0)
    batches = poisson_batches(1000, 0.05, gen)
    sizes = torch.tensor([len(next(batches)) for _ in range(400)], dtype=torch.float)
    assert sizes.mean().item() == pytest.approx(50, rel=0.03)  # mean q N, standard error ~0.5%
    assert sizes.var().item() == pytest.approx(1000 * 0.05 * 0.95, rel=0.25)  # binomial variance
    first = next(poisson_batches(1000, 0.05, torch.Generator().manual_seed(1)))
    assert len(set(first.tolist())) == len(first)  # no repeats within a batch


def test_secret_generator_default_is_not_reproducible():
    a, b = secret_generator(None), secret_generator(None)
    assert not torch.equal(torch.randn(5, generator=a), torch.randn(5, generator=b))
    assert torch.equal(torch.randn(5, generator=secret_generator(7)), torch.randn(5, generator=secret_generator(7)))


def test_a_secret_cpu_generator_has_the_whole_mt19937_state_from_os_entropy(monkeypatch):
    """torch seeds mt19937 from the low 32 bits of manual_seed's argument (4.3e9 streams, few
    enough to search); a secret generator's 624 state words come from os.urandom instead. The
    reference is Python's own mt19937, set to those words: the same stream, bit for bit."""
    import os
    import random
    import struct

    from dpwa.privacy import seed_state

    seed = (1 << 40) + 12345  # manual_seed's 32-bit truncation, the weakness fixed here
    assert torch.equal(torch.rand(4, generator=torch.Generator().manual_seed(seed)),
                       torch.rand(4, generator=torch.Generator().manual_seed(seed & 0xFFFFFFFF)))
    entropy = bytes(range(256)) * 9 + bytes(range(192))  # 2496 bytes: 624 words
    drawn = []
    monkeypatch.setattr(os, "urandom", lambda n: drawn.append(n) or entropy[:n])
    g = secret_generator(None)
    assert drawn == [2496]
    words = struct.unpack("<624I", entropy)
    reference = random.Random()
    reference.setstate((3, tuple(words) + (624,), None))
    expected = [(reference.getrandbits(32) & 0xFFFFFF) / 2 ** 24 for _ in range(64)]  # torch's float: 24 bits
    assert torch.rand(64, generator=g, dtype=torch.float64).tolist() != expected  # float64 takes 53 bits
    g = seed_state(torch.Generator(), entropy)
    assert torch.rand(64, generator=g).tolist() == expected
    with pytest.raises(ValueError, match="takes 2496 bytes of entropy, got 8"):
        seed_state(torch.Generator(), b"12345678")


def test_a_private_sessions_sampling_coins_are_the_whole_secret_state(monkeypatch, tmp_path):
    """The Poisson sampling generator of a private run (no noise_seed) gets its state from
    `seed_state`, not from a seed; a reproducible (noise_seed) run's keeps train.seed + 1."""
    import dpwa.train as train_module
    from tests.dpwa.test_train import tiny

    states = []
    real = train_module.seed_state
    monkeypatch.setattr(train_module, "seed_state", lambda g, e: states.append(len(e)) or real(g, e))
    train_module.train(tiny(tmp_path, "train.steps=2", "privacy.noise_seed=null"), ledger_path=str(tmp_path / "l.sqlite"),
                       progress=False)
    assert states == [2496]
    states.clear()
    train_module.train(tiny(tmp_path / "r", "train.steps=2"), ledger_path=str(tmp_path / "l.sqlite"), progress=False)
    assert states == []


def test_batchnorm_is_refused_with_a_pointer_to_groupnorm():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    with pytest.raises(ModelError, match="GroupNorm"):
        check_dp_compatible(model)


def test_a_hook_added_after_the_probe_is_probed_again():
    """PrivateSGD probes on its first step; a forward hook added later (here one that subtracts
    the batch mean, so examples mix) changes what trains, and the next step probes again and
    refuses it before releasing anything."""
    from dpwa.probe import ProbeError

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5))
    sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), noise_multiplier=1.0, clip_norm=1.0,
                     expected_batch_size=4, releases=3)
    views, labels = torch.randn(4, 1, 3, 8, 8), torch.randint(0, 5, (4,))
    sgd.step([(views, labels)])
    model[1].register_forward_hook(lambda m, i, o: o - o.mean(0, keepdim=True))
    with pytest.raises(ProbeError, match="mix"):
        sgd.step([(views, labels)])
    assert sgd.mechanism.released == 1


def test_a_keyed_state_is_a_whole_state_per_label_and_needs_a_real_key():
    """`keyed_state`: each (key, labels) gets its own full mt19937 state (a hash, not a 32-bit
    seed), the same one every time (no state to checkpoint), and the key must be long."""
    from dpwa.privacy import keyed_state, seed_state

    key = bytes(range(32))

    def draws(k, *labels):
        return torch.rand(8, generator=keyed_state(torch.Generator(), k, *labels)).tolist()

    import hashlib
    digest = hashlib.shake_256((32).to_bytes(4, "little") + key + (3).to_bytes(8, "little")
                               + (1).to_bytes(8, "little")).digest(2496)
    assert draws(key, 3, 1) == torch.rand(8, generator=seed_state(torch.Generator(), digest)).tolist()
    assert draws(key, 3, 1) == draws(key, 3, 1)
    assert len({tuple(draws(key, r, k)) for r in range(4) for k in range(2)}) == 8
    assert draws(key, 3, 1) != draws(bytes(31) + b"\x01", 3, 1)
    with pytest.raises(ValueError, match="at least 16 bytes, got 8"):
        keyed_state(torch.Generator(), b"12345678", 0)


def test_the_gradient_mechanisms_default_noise_is_secret_not_torchs_global_generator():
    """`PrivateSGD(generator=None)` on a user's own loop, after the usual torch.manual_seed: the
    noise must not be the global generator's (known from the seed, it could be subtracted from
    the released weights); two identically seeded runs get different noise."""
    def noisy_step():
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        sgd = PrivateSGD(model, torch.optim.SGD(model.parameters(), lr=1.0), noise_multiplier=1.0, clip_norm=1.0,
                         expected_batch_size=2)
        assert sgd.mechanism.generator is not None
        sgd.step([(torch.randn(2, 1, 3), torch.tensor([0, 1]))])
        return model.weight.detach().clone()

    assert not torch.equal(noisy_step(), noisy_step())
