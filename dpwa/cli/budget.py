"""`dpwa budget`: answer a budget question; leave out the one quantity you want.

Of noise multiplier (--sigma), steps (--steps or --epochs), --epsilon and --delta, give
three and get the fourth. The sample rate comes from --sample-rate or from
--batch-size/--dataset-size (q = B/N).

With --config CONFIG, --batch-size is a new batch size for that config: the steps at the
same epochs, the noise for the same epsilon, the learning rate by Granziol et al.'s linear
(SGD) or square-root (Adam) rule, and TAN's alternative (Sander et al. 2023): same steps,
sigma scaled with the batch so that sigma/B stays fixed (`dpwa.scaling`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import warnings

from accounting import accountants, calibrate
from accounting.errors import InvalidParameterError
from accounting.events import PoissonGaussian

from dpwa import scaling

from ._format import fmt, print_json, print_table

EXAMPLES = """examples:
  # epsilon of De et al.'s CIFAR-10 setting
  dpwa budget --sigma 3 --sample-rate 0.08192 --steps 2468 --delta 1e-5
  # the noise that epsilon 8 needs for 3000 steps
  dpwa budget --epsilon 8 --delta 1e-5 --sample-rate 0.08192 --steps 3000
  # how many steps epsilon 8 allows at sigma 3
  dpwa budget --epsilon 8 --sigma 3 --delta 1e-5 --batch-size 4096 --dataset-size 50000
  # delta at epsilon 8, with batch size, dataset size and epochs, RDP accountant
  dpwa budget --epsilon 8 --sigma 3 --batch-size 4096 --dataset-size 50000 --epochs 200 --accountant rdp
  # a config at another batch size: steps, noise, learning rate; TAN's fixed sigma/B alternative
  dpwa budget --config configs/quickstart.yaml --batch-size 512
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("budget", help="epsilon, noise, steps or delta of a DP-SGD configuration",
                       description=__doc__, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sigma", "--noise-multiplier", dest="sigma", type=float, help="noise multiplier")
    p.add_argument("--epsilon", type=float, help="target or budget epsilon")
    p.add_argument("--delta", type=float, help="delta, below 1/N")
    p.add_argument("--steps", type=int, help="number of DP-SGD steps")
    p.add_argument("--sample-rate", type=float, help="Poisson sample rate q in (0, 1]")
    p.add_argument("--batch-size", type=int, help="expected logical batch size B (with --dataset-size)")
    p.add_argument("--dataset-size", type=int, help="number of training examples N")
    p.add_argument("--epochs", type=float, help="passes over the data, in place of --steps")
    p.add_argument("--accountant", choices=sorted(accountants.ACCOUNTANTS),
                   help=f"privacy accountant (default: {accountants.DEFAULT_ACCOUNTANT}, upper bound; with --config, "
                        "the config's)")
    p.add_argument("--config", metavar="CONFIG",
                   help="a training config to move to --batch-size (its epsilon, delta, epochs or steps, lr)")
    p.add_argument("--rule", choices=scaling.RULES,
                   help="with --config: lr scaling, linear (SGD) or sqrt (Adam); default from optim.name")
    p.add_argument("--rtol", type=float, default=0.01, help="noise calibration lands in [(1-rtol)eps, eps]")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(run=run)


def _sample_rate(a: argparse.Namespace) -> tuple[float, int | None]:
    """q, and the number of steps if --epochs was given."""
    by_batch = a.batch_size is not None or a.dataset_size is not None
    if a.sample_rate is not None and by_batch:
        raise InvalidParameterError("Give either --sample-rate or --batch-size with --dataset-size, not both")
    if a.epochs is not None and a.steps is not None:
        raise InvalidParameterError("Give either --steps or --epochs, not both")
    if a.epochs is not None and not (a.batch_size and a.dataset_size):
        raise InvalidParameterError("--epochs needs --batch-size and --dataset-size to count steps")
    if by_batch:
        if a.batch_size is None or a.dataset_size is None:
            raise InvalidParameterError("--batch-size and --dataset-size go together (q = B/N)")
        q, steps = calibrate.sample_rate_and_steps(batch_size=a.batch_size, dataset_size=a.dataset_size,
                                                   epochs=a.epochs if a.epochs is not None else 0)
        return q, steps if a.epochs is not None else None
    if a.sample_rate is None:
        raise InvalidParameterError("Give the sample rate: --sample-rate Q, or --batch-size B --dataset-size N")
    return a.sample_rate, None


def run(a: argparse.Namespace) -> int:
    if a.config is not None or a.rule is not None:
        return _scale(a)
    q, epoch_steps = _sample_rate(a)
    steps = a.steps if a.steps is not None else epoch_steps
    known = {"sigma": a.sigma, "steps": steps, "epsilon": a.epsilon, "delta": a.delta}
    missing = [k for k, v in known.items() if v is None]
    if len(missing) != 1:
        hint = "leave out exactly one" if not missing else f"missing: {', '.join(missing)}"
        raise InvalidParameterError(
            f"Give three of --sigma, --steps/--epochs, --epsilon, --delta and dpwa computes the fourth ({hint})")
    # Validate every given value up front, with its name in the message.
    PoissonGaussian(noise_multiplier=a.sigma if a.sigma is not None else 1.0, sample_rate=q,
                    steps=steps if steps is not None else 0)
    if a.delta is not None:
        accountants.check_delta(a.delta)
        if a.dataset_size and a.delta >= 1 / a.dataset_size:
            warnings.warn(f"delta={a.delta:g} is not below 1/N = {1 / a.dataset_size:g}")
    if a.epsilon is not None:
        calibrate.check_target_epsilon(a.epsilon)

    solve = missing[0]
    acc = a.accountant or accountants.DEFAULT_ACCOUNTANT
    if solve == "epsilon":
        known["epsilon"] = calibrate.epsilon_for(noise_multiplier=a.sigma, sample_rate=q, steps=steps,
                                                 delta=a.delta, accountant=acc)
    elif solve == "sigma":
        if steps < 1:
            raise InvalidParameterError(f"Expected steps >= 1 to calibrate noise, got {steps=}")
        known["sigma"] = calibrate.noise_multiplier_for(target_epsilon=a.epsilon, delta=a.delta, sample_rate=q,
                                                        steps=steps, accountant=acc, rtol=a.rtol)
    elif solve == "steps":
        known["steps"] = calibrate.steps_for(target_epsilon=a.epsilon, delta=a.delta, noise_multiplier=a.sigma,
                                             sample_rate=q, accountant=acc)
    else:
        known["delta"] = accountants.delta([PoissonGaussian(noise_multiplier=a.sigma, sample_rate=q, steps=steps)],
                                           epsilon=a.epsilon, accountant=acc)
    spent = None
    if solve in ("sigma", "steps"):  # what the answer actually spends, <= the target
        spent = calibrate.epsilon_for(noise_multiplier=known["sigma"], sample_rate=q, steps=known["steps"],
                                      delta=known["delta"], accountant=acc)
    epochs = known["steps"] * q if a.dataset_size else None

    result = {"solved_for": {"sigma": "noise_multiplier"}.get(solve, solve), "accountant": acc,
              "noise_multiplier": known["sigma"], "sample_rate": q, "steps": known["steps"],
              "epochs": epochs, "epsilon": known["epsilon"], "delta": known["delta"]}
    if spent is not None:
        result["epsilon_spent"] = spent
    if a.json:
        print_json(result)
        return 0
    label = {"prv": "prv (upper bound)", "rdp": "rdp", "pld": "pld"}[acc]
    computed = {"sigma": "noise multiplier", "steps": "steps", "epsilon": "epsilon", "delta": "delta"}[solve]
    rows = [["accountant", label], ["noise multiplier", fmt(known["sigma"])], ["sample rate", fmt(q)],
            ["steps", fmt(known["steps"])], *([["epochs", fmt(epochs)]] if epochs is not None else []),
            ["delta", fmt(known["delta"])], ["epsilon", fmt(known["epsilon"])]]
    rows = [[name, value, "<- computed" if name == computed else ""] for name, value in rows]
    if spent is not None:
        rows.append(["epsilon spent", fmt(spent), f"(<= {fmt(a.epsilon)})"])
    print_table(rows)
    if solve == "steps" and known["steps"] == 0:  # an answer, but one a user should not miss
        one = calibrate.epsilon_for(noise_multiplier=known["sigma"], sample_rate=q, steps=1, delta=known["delta"],
                                    accountant=acc)
        print(f"not even one step fits epsilon {fmt(a.epsilon)}: one step spends {fmt(one)}; raise the noise "
              "multiplier or lower the sample rate")
    return 0


# Config keys that count steps: at the same epochs they should move with the steps (x S'/S); a
# method's own are its `step_keys`.
_STEP_KEYS = (("optim", "warmup_steps"), ("optim", "cycle_start"), ("optim", "cycle_length"), ("optim", "sgdr_t0"),
              ("averaging", "polyak_start"), ("averaging", "swa_start"), ("averaging", "swa_every"),
              ("train", "eval_every"))


def _scale(a: argparse.Namespace) -> int:
    """`--config CONFIG --batch-size B'`: `dpwa.scaling.rescale` for the config's plan (the
    same `plan_run` as training: releases per step, feature-statistics releases). Reads the
    config; counts the training set only when --dataset-size is not given (withheld, never read)."""
    given = [f"--{k.replace('_', '-')}" for k in ("sigma", "epsilon", "delta", "steps", "sample_rate", "epochs")
             if getattr(a, k) is not None]
    if a.config is None:
        raise InvalidParameterError("--rule goes with --config CONFIG --batch-size B (a config at a new batch size)")
    if given:
        raise InvalidParameterError(f"With --config, the config gives epsilon, delta and the run length; drop "
                                    f"{', '.join(given)} (--batch-size is the new batch size)")
    if a.batch_size is None:
        raise InvalidParameterError("--config needs --batch-size B: the new batch size")
    from dpwa.config import load_config

    cfg = load_config(a.config)
    p = cfg.privacy
    if not p.enabled:
        raise InvalidParameterError(f"{a.config} trains without privacy: there is no noise to rescale")
    n = a.dataset_size if a.dataset_size is not None else _training_set_size(cfg)
    if not 1 <= a.batch_size <= n:
        raise InvalidParameterError(f"--batch-size must be in [1, N={n}], got {a.batch_size}")
    from dpwa.methods import METHODS
    from dpwa.train import plan_run
    from dpwa.validation import validation_event

    plan = plan_run(cfg, n)
    acc = a.accountant or p.accountant

    def eval_every(steps: int) -> int:
        """train.eval_every scaled as the hint below says (x S'/S, rounded half up, at least 1):
        the same number of evaluations per epoch."""
        return cfg.train.eval_every and max(1, math.floor(cfg.train.eval_every * steps / plan.steps + 0.5))

    def validation(steps: int):
        """The accuracies of a run of `steps` steps, evaluated every `eval_every(steps)`."""
        return validation_event(dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, eval_every=eval_every(steps))), steps)

    rule = a.rule or scaling.default_rule(cfg.optim.name)
    s = scaling.rescale(batch_size=cfg.train.batch_size, new_batch_size=a.batch_size, dataset_size=n,
                        steps=plan.steps, epochs=cfg.train.epochs, lr=cfg.optim.lr, rule=rule, delta=p.delta,
                        epsilon=p.epsilon, noise_multiplier=plan.noise_multiplier, accountant=acc, rtol=a.rtol,
                        prior=lambda steps: [e for e in (plan.statistics, validation(steps)) if e],
                        releases=lambda steps: METHODS[cfg.method.name].releases(cfg, steps))
    method_keys = (("method", key) for key in METHODS[cfg.method.name].step_keys)
    step_keys = {f"{sec}.{key}": getattr(getattr(cfg, sec), key) for sec, key in (*_STEP_KEYS, *method_keys)
                 if getattr(getattr(cfg, sec), key)}
    columns = {"current": s.current, "same_epochs": s.same_epochs, "tan": s.tan}
    if a.json:
        print_json({"config": a.config, "dataset_size": n, "optimizer": cfg.optim.name, "rule": rule,
                    "accountant": acc, "delta": p.delta, "target_epsilon": s.target_epsilon,
                    **{k: {**vars(v), "sigma_over_b": v.sigma_over_b} for k, v in columns.items()},
                    "step_keys": step_keys, "charged": False,
                    **({"same_epochs_eval_every": eval_every(s.same_epochs.steps)}
                       if validation(s.current.steps) is not None else {})})
        return 0
    print(f"{a.config}: N = {n}, {cfg.method.name} with {cfg.optim.name}, {acc}, delta {fmt(p.delta)}, "
          f"epsilon {fmt(s.target_epsilon)} (charges nothing)")
    fields = [("batch size", "batch_size"), ("steps", "steps"), ("epochs", "epochs"),
              ("noise multiplier", "noise_multiplier"), ("sigma / B", "sigma_over_b"), ("learning rate", "lr"),
              ("epsilon", "epsilon")]
    print_table([[label, *(fmt(getattr(v, key)) for v in columns.values())] for label, key in fields],
                header=["", "current", "same epochs", "TAN: same steps, sigma/B"])
    c, e, t = s.current, s.same_epochs, s.tan
    print(f"  same epochs: sigma recalibrated for the epsilon; lr by the {rule} rule (Granziol et al. 2022: "
          f"{'SGD lr ~ B' if rule == 'linear' else 'Adam lr ~ sqrt(B)'}; open under DP noise); sigma/B goes "
          f"{fmt(c.sigma_over_b)} -> {fmt(e.sigma_over_b)}")
    print(f"  TAN (Sander et al. 2023): steps and sigma/B fixed, lr kept, epsilon {fmt(t.epsilon)} computed; "
          f"compute x{fmt(t.batch_size / c.batch_size)}")
    if min(c.noise_multiplier, t.noise_multiplier) < 2:
        print("  note: sigma below ~2 is TAN's overcharged regime: epsilon is no longer set by sigma/B and steps alone")
    if step_keys:
        keys = ", ".join(f"{k}={v}" for k, v in step_keys.items())
        print(f"  these keys count steps; at the same epochs scale them by {fmt(e.steps / c.steps)}: {keys}")
        if validation(c.steps) is not None and "train.eval_every" in step_keys:
            print(f"  the same-epochs sigma counts the validation accuracies at train.eval_every={eval_every(e.steps)} "
                  f"(scaled so, rounded half up)")
    lr_keys = {f"optim.{k}": getattr(cfg.optim, k) for k in ("min_lr", "swa_lr") if getattr(cfg.optim, k)}
    if lr_keys and e.lr != c.lr:  # the schedule's other rates keep their ratio to optim.lr (and stay <= it)
        print(f"  these keys are learning rates; at the same epochs scale them by {fmt(e.lr / c.lr)} with optim.lr: "
              + ", ".join(f"{k}={fmt(v)}" for k, v in lr_keys.items()))
    return 0


def _training_set_size(cfg) -> int:
    """N of the config's training split (after data.val_size), the split withheld: its size is
    known, its examples are never read here. Loads the sources (torch); --dataset-size avoids it."""
    import dataclasses

    from dpwa.data import load_data

    raw = dataclasses.replace(cfg.data, features="none")  # the size only: no scattering pass over the test split
    return len(load_data(raw, withhold_train=True).train)
