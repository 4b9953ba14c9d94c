"""How close do dpwa's audits get to the accountant, and do they catch planted bugs?

    python experiments/audit_bounds.py [--canaries 1000 5000] [--out experiments/results/audit_bounds.md]

For each mechanism: the accountant's epsilon (PRV) and the two empirical lower bounds of
`dpwa audit` (white-box gradient canaries through the real PrivateSGD, dpwa-fast engine,
Poisson sampler; 95% confidence), with their fraction of the accountant's epsilon. The
mechanisms are the quickstart's, the planted-bug tests' claim (correct and with each bug),
and a full-batch Gaussian mechanism, where audits are known to be nearly tight.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dpwa.audit import Mechanism, audit  # noqa: E402
from tests.audit.test_planted_bugs import BUGS, CLAIM  # noqa: E402

MECHANISMS = {
    "quickstart (sigma 2.75, q 0.171, 150 steps, K 4), delta 1e-4":
        (Mechanism(noise_multiplier=2.749, sample_rate=256 / 1497, steps=150, augmult_k=4, physical_batch_size=128),
         1e-4, {}),
    "test claim (sigma 2, q 0.1, 30 steps, K 4), delta 1e-5": (CLAIM, 1e-5, {}),
    **{f"test claim with bug: {name}": (kw.get("claim", CLAIM), 1e-5, {k: v for k, v in kw.items() if k != "claim"})
       for name, kw in BUGS.items()},
    "full batch (sigma 2, q 1, 4 steps), delta 1e-5":
        (Mechanism(noise_multiplier=2.0, sample_rate=1.0, steps=4, physical_batch_size=512), 1e-5, {}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--canaries", type=int, nargs="+", default=[1000, 5000])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "audit_bounds.md")
    a = ap.parse_args()
    lines = ["Command: `python experiments/audit_bounds.py " + " ".join(sys.argv[1:]) + "` (2 CPU cores; each bound "
             "at 95% confidence, the verdict, either bound above the accountant's epsilon, at 90%; white-box gradient "
             "canaries, dpwa-fast engine).", "",
             "| mechanism | canaries | accountant epsilon | Clopper-Pearson | one run | best / accountant | verdict |",
             "|---|---|---|---|---|---|---|"]
    for name, (mech, delta, bug) in MECHANISMS.items():
        for m in a.canaries:
            r = audit(mech, delta=delta, canaries=m, **bug)
            cp, one = r.bounds
            best = max(cp.epsilon, one.epsilon)
            row = (f"| {name} | {m} | {r.claimed_epsilon:.3f} | {cp.epsilon:.3f} | {one.epsilon:.3f} | "
                   f"{best / r.claimed_epsilon:.2f} | {'VIOLATION' if r.violated else 'consistent'} |")
            print(row, flush=True)
            lines.append(row)
    a.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
