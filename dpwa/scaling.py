"""What changes when a DP-SGD configuration moves to another batch size: torch-free
arithmetic behind `dpwa budget --config CONFIG --batch-size B'`. It charges nothing.

Two ways to move, both at the config's epsilon and delta:

* Same epochs (the plain large-batch recipe): steps S' = ceil(epochs N / B'), the noise
  multiplier recalibrated for epsilon at q' = B'/N, and the learning rate scaled by
  Granziol et al.'s rules (JMLR 2022, "Learning rates as a function of batch size"): max lr
  proportional to B for SGD (linear), to sqrt(B) for Adam (square root). They come from the
  batch Hessian's outliers; the DP noise does not change that Hessian, but whether the
  rules hold at fixed epsilon is open (docs/methods.md section 9a).
* TAN (Sander, Stock & Sablayrolles, ICML 2023, "TAN without a burn"): when sigma is not
  too small (~2 or more), epsilon depends essentially on the steps and sigma/B, the noise on
  the mean gradient (its std is sigma C / B). Scaling sigma with B at fixed steps keeps
  both, so epsilon and the optimisation nearly stay put (same lr), at compute proportional
  to B; small-batch runs then predict large-batch ones. The epsilon it really spends is
  computed, not assumed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from accounting import calibrate
from accounting.errors import InvalidParameterError
from accounting.events import Event

__all__ = ["RULES", "default_rule", "scale_lr", "Setting", "Scaling", "rescale"]

RULES = ("linear", "sqrt")


def default_rule(optimizer: str) -> str:
    """Granziol et al.'s rule for an optimizer name: linear for SGD, square root for the
    Adam family (adam, adamw, adambc, padam).

    >>> default_rule("sgd"), default_rule("adamw")
    ('linear', 'sqrt')
    """
    return "linear" if optimizer == "sgd" else "sqrt"


def scale_lr(lr: float, batch_size: int, new_batch_size: int, rule: str) -> float:
    """lr x (B'/B) (linear) or lr x sqrt(B'/B) (sqrt): Granziol's SGD and Adam recipes,
    e.g. SGD 0.05 at 128 -> 0.2 at 512, Adam 4e-4 at 128 -> 5.66e-4 at 256.

    >>> scale_lr(0.05, 128, 512, "linear"), round(scale_lr(4e-4, 128, 256, "sqrt"), 7)
    (0.2, 0.0005657)
    """
    if rule not in RULES:
        raise InvalidParameterError(f"rule must be one of {RULES}, got {rule!r}")
    ratio = new_batch_size / batch_size
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


@dataclass(frozen=True)
class Setting:
    batch_size: int
    sample_rate: float
    steps: int
    releases: int       # noisy gradient releases (the method's count for `steps`)
    epochs: float
    noise_multiplier: float
    lr: float
    epsilon: float      # what it spends (composed after the prior events)

    @property
    def sigma_over_b(self) -> float:
        """sigma / B: the std of the noise on the mean gradient, in units of the clip norm C."""
        return self.noise_multiplier / self.batch_size


@dataclass(frozen=True)
class Scaling:
    rule: str
    target_epsilon: float
    current: Setting
    same_epochs: Setting  # epochs and epsilon fixed; sigma recalibrated, lr by the rule
    tan: Setting          # steps and sigma/B fixed; lr kept; epsilon computed


def rescale(*, batch_size: int, new_batch_size: int, dataset_size: int, steps: int, lr: float, rule: str,
            delta: float, epsilon: Optional[float] = None, noise_multiplier: Optional[float] = None,
            epochs: Optional[float] = None, accountant: str = "prv", rtol: float = 0.01,
            prior: Sequence[Event] | Callable[[int], Sequence[Event]] = (),
            releases: Callable[[int], int] = lambda steps: steps) -> Scaling:
    """The config's setting at `batch_size`, and the two moves to `new_batch_size`.

    Give the current `noise_multiplier`, the target `epsilon`, or both (a config that
    calibrated sigma for epsilon); the target defaults to what the current setting spends.
    `epochs` is the config's (else steps B / N); `releases(steps)` the method's count of
    noisy releases; `prior` events every setting composes with (released feature statistics),
    or a function of the steps giving them (validation accuracies, one set per evaluation).

    Raises:
        InvalidParameterError: a batch size that is not an integer in [1, N], a bad rule, or
            a target no noise multiplier meets.

    >>> s = rescale(batch_size=256, new_batch_size=1024, dataset_size=50000, steps=1000, lr=2.0,
    ...             rule="linear", epsilon=8.0, delta=1e-5, accountant="rdp")
    >>> s.same_epochs.steps, s.same_epochs.lr, s.tan.steps, s.tan.noise_multiplier / s.current.noise_multiplier
    (250, 8.0, 1000, 4.0)
    >>> s.same_epochs.epsilon <= 8.0 and s.same_epochs.sigma_over_b < s.current.sigma_over_b
    True
    """
    if noise_multiplier is None and epsilon is None:
        raise InvalidParameterError("Give the current noise_multiplier or the target epsilon")
    q, _ = calibrate.sample_rate_and_steps(batch_size=batch_size, dataset_size=dataset_size, epochs=0)
    new_q, _ = calibrate.sample_rate_and_steps(batch_size=new_batch_size, dataset_size=dataset_size, epochs=0)
    scale_lr(lr, batch_size, new_batch_size, rule)  # validates the rule before any accountant call
    epochs = epochs if epochs is not None else steps * batch_size / dataset_size
    _, new_steps = calibrate.sample_rate_and_steps(batch_size=new_batch_size, dataset_size=dataset_size,
                                                   epochs=epochs)

    prior_of = prior if callable(prior) else (lambda n: prior)

    def spend(sigma: float, rate: float, n: int) -> float:
        return calibrate.epsilon_for(noise_multiplier=sigma, sample_rate=rate, steps=releases(n), delta=delta,
                                     accountant=accountant, prior=prior_of(n))

    sigma = noise_multiplier if noise_multiplier is not None else calibrate.noise_multiplier_for(
        target_epsilon=epsilon, delta=delta, sample_rate=q, steps=releases(steps), accountant=accountant,
        rtol=rtol, prior=prior_of(steps))
    spent = spend(sigma, q, steps)
    target = epsilon if epsilon is not None else spent
    new_sigma = calibrate.noise_multiplier_for(target_epsilon=target, delta=delta, sample_rate=new_q,
                                               steps=releases(new_steps), accountant=accountant, rtol=rtol,
                                               prior=prior_of(new_steps))
    tan_sigma = sigma * new_batch_size / batch_size
    current = Setting(batch_size, q, steps, releases(steps), steps * q, sigma, lr, spent)
    same = Setting(new_batch_size, new_q, new_steps, releases(new_steps), new_steps * new_q, new_sigma,
                   scale_lr(lr, batch_size, new_batch_size, rule), spend(new_sigma, new_q, new_steps))
    tan = Setting(new_batch_size, new_q, steps, releases(steps), steps * new_q, tan_sigma, lr,
                  spend(tan_sigma, new_q, steps))
    return Scaling(rule, target, current, same, tan)
