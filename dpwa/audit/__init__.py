"""Empirical privacy auditing (`dpwa audit`): lower bounds on epsilon, next to the accountant's.

The accountant gives an upper bound on epsilon that holds *if the code implements the
mechanism it was told about*. An audit checks that premise from outside: it runs the
mechanism with canaries and measures how well their membership can be told apart. A lower
bound above the accountant's epsilon proves a bug (noise too small, clipping at the wrong
place, a sample rate recorded too low...); a lower bound at a good fraction of it shows the
audit was strong enough to have caught one. `tests/audit/test_planted_bugs.py` plants such
bugs and checks that the audit flags each.

One run of the configured mechanism with white-box gradient canaries (`canaries.py`), two
analyses of its scores (`bounds.py`):
  (a) Clopper-Pearson bounds over independent canaries (Jagielski et al. 2020; Nasr et al. 2021),
  (b) the one-run audit of Steinke, Nasr and Jagielski 2023.
The probe reads no private data, so an audit costs no privacy and touches no ledger.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from accounting import PoissonGaussian, epsilon

from .bounds import Bound, clopper_pearson_bound, one_run_bound, one_run_p_value
from .canaries import CanaryRun, Mechanism, canary_run, null_thresholds, probe_sgd

__all__ = ["Audit", "audit", "Bound", "Mechanism", "CanaryRun", "canary_run", "probe_sgd",
           "clopper_pearson_bound", "one_run_bound", "one_run_p_value"]

_FPRS = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001)


@dataclasses.dataclass(frozen=True)
class Audit:
    mechanism: Mechanism
    delta: float
    accountant: str
    claimed_epsilon: float        # the accountant's upper bound for the mechanism as claimed
    bounds: tuple[Bound, ...]     # empirical lower bounds
    run: CanaryRun

    @property
    def violated(self) -> bool:
        """A lower bound above the claim: the implementation is not the claimed mechanism."""
        return any(b.epsilon > self.claimed_epsilon for b in self.bounds)

    @property
    def verdict_confidence(self) -> float:
        """Each bound holds at its own confidence; the verdict ("any bound above the claim")
        at 1 - (the sum of their error probabilities), by the union bound: a correct mechanism
        is flagged with probability at most that."""
        return max(0.0, 1 - sum(1 - b.confidence for b in self.bounds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mechanism": dataclasses.asdict(self.mechanism), "delta": self.delta, "accountant": self.accountant,
            "claimed_epsilon": self.claimed_epsilon, "violated": self.violated,
            "verdict_confidence": self.verdict_confidence,
            "canaries": int(len(self.run.scores)), "canaries_in": int(self.run.included.sum()),
            "base_examples": self.run.base_examples, "seconds": self.run.seconds,
            "bounds": [{**dataclasses.asdict(b), "fraction_of_claim": b.epsilon / self.claimed_epsilon}
                       for b in self.bounds],
        }


def audit(mech: Mechanism, *, delta: float, accountant: str = "prv", canaries: int = 1000, confidence: float = 0.95,
          seed: int = 0, **run_kwargs: Any) -> Audit:
    """Audit `mech` at `delta`: one canary run, both lower bounds, and the accountant's
    epsilon. `run_kwargs` go to `canary_run` (tests plant bugs through them)."""
    claimed = epsilon([PoissonGaussian(noise_multiplier=mech.noise_multiplier, sample_rate=mech.sample_rate,
                                       steps=mech.steps)], delta=delta, accountant=accountant)
    run = canary_run(mech, canaries=canaries, seed=seed, **run_kwargs)
    inside, outside = run.scores[run.included], run.scores[~run.included]
    # Tests fixed in advance: false-positive rates that at least 5 expected out-canaries can show.
    fprs = tuple(f for f in _FPRS if f * len(run.scores) / 2 >= 5)
    thresholds = null_thresholds(mech, fprs, seed=seed)
    bounds = (clopper_pearson_bound(inside, outside, delta=delta, confidence=confidence, thresholds=thresholds,
                                    seed=seed),
              one_run_bound(run.scores, run.included, delta=delta, confidence=confidence))
    return Audit(mech, delta, accountant, claimed, bounds, run)
