"""Run configuration: a tree of frozen, typed dataclasses; YAML holds values only.

`load_config(path, overrides)` merges the dataclass defaults, a YAML file and dotted
overrides (`optim.lr=4 augmult.k=8`) with OmegaConf. Unknown keys and wrong types fail
with the key named; out-of-range values fail in `__post_init__` with the value named.
The resolved config is what a run folder's `config.yaml` holds.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from accounting import MIN_NOISE_MULTIPLIER

from .alloc import limit_error
from .errors import UsageError

__all__ = ["RunConfig", "DataConfig", "ModelConfig", "AugmultConfig", "PrivacyConfig", "OptimConfig",
           "AveragingConfig", "TrainConfig", "MethodConfig", "FeatureStatsConfig", "CONFIG_VERSION", "ConfigError", "load_config", "config_to_yaml", "config_from_yaml_text"]


class ConfigError(UsageError, ValueError):
    """A config file or override is invalid; the message names the key and the value (exit 2)."""


def _known(key: str, value: str, module: str, registry: str) -> None:
    """Refuse a name its registry does not hold. The registry is read, not copied, so a
    registered extension is accepted here too; imported lazily (the registries import torch)."""
    names = _registry(module, registry)
    _require(value in names, f"{key} must be one of {', '.join(sorted(names))}; got {value!r}")


def _registry(module: str, registry: str):
    import importlib
    return getattr(importlib.import_module(module), registry)


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch here


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _unused(key: str, value: Any, needs: str) -> None:
    """A setting whose feature is off: warned of, not refused (a run folder's config.yaml from
    before this check may hold one, and must still load), and not ignored in silence."""
    warnings.warn(f"{key}={value} has no effect without {needs}", UserWarning, stacklevel=4)


def _require_finite(section: str, cfg: Any) -> None:
    """Every number of a config section finite: an infinite lr, clip norm or weight decay passes
    every `> 0` check and would train (and be charged) into NaN weights."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            _require(not isinstance(v, float) or math.isfinite(v), f"{section}.{f.name} must be finite, got {value}")


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"            # a source of dpwa.data.SOURCES: digits | cifar10 | cifar100 | npz | imagefolder
    # torchvision CIFAR folder; folder with train.npz / test.npz; or (imagefolder) a folder with
    # train/<class>/* and val/<class>/* (the ImageNet layout; val is the test split)
    root: Optional[str] = None
    download: bool = True           # let torchvision download CIFAR when it is missing
    val_size: int = 0               # examples carved from train for validation; never trained on
    # how they are chosen (dpwa.data.carve): stable (each example's side is a function of its own
    # content and label, so adding or removing one example moves at most one other) or permutation
    # (a seeded shuffle of the whole split, as dpwa chose before: one example reshuffles all)
    val_carve: str = "stable"
    # the carve's seed (either way of carving), apart from train.seed so that runs of different
    # seeds (the endpoints of a curve, repeats) hold out one validation split; run folders from
    # before it read their train.seed
    val_seed: int = 0
    ledger_name: Optional[str] = None  # the dataset's name in the privacy ledger (default: name)
    # Per-channel normalisation, in [0, 1] units. Public constants, never statistics of the
    # private data (that would be a release outside the DP mechanism). Default: the published
    # CIFAR values for cifar10/cifar100, 0.5 / 0.25 otherwise.
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    # Fixed features computed once from the normalised images before training: none, or
    # scattering (ScatterNet J=2 L=8, Tramer & Boneh 2021; needs augmult.k=1).
    features: str = "none"
    image_size: Optional[int] = None  # resize (shorter side) and centre-crop every image to this; imagefolder needs it
    # imagefolder: decode every private (train and validation) file once before the reservation,
    # refusing the run if any cannot be (naming them); false skips that pass (ImageNet scale), and
    # a file that fails in a step then stops the run reserved, at a step that says it was drawn
    check_images: bool = True
    classes: Optional[list[int]] = None  # keep only these labels, renumbered 0.. in this order (class splits)
    # A public dataset (no privacy needed) may be trained with privacy.enabled=false, e.g. to
    # pretrain a model for private fine-tuning. The user declares it; a private one never can.
    public: bool = False
    # Test-time flip: every validation and test prediction is the mean softmax of the image and
    # its horizontal mirror image (with data.features, the features of the mirrored image).
    # Free: it reads only the released model and the evaluation split.
    test_time_flip: bool = False

    def __post_init__(self) -> None:
        _known("data.name", self.name, "dpwa.data", "SOURCES")
        _require(self.features == "none" or self.features in _registry("dpwa.features", "FEATURES"),
                 f"data.features must be none or one of {', '.join(_registry('dpwa.features', 'FEATURES'))}; "
                 f"got {self.features!r}")
        _require(self.image_size is None or self.image_size >= 8,
                 f"data.image_size must be >= 8, got {self.image_size}")
        _require(self.name != "imagefolder" or (bool(self.root) and self.image_size is not None),
                 "data.name=imagefolder needs data.root (with train/ and val/ class folders) and data.image_size")
        _require(self.name != "imagefolder" or self.features == "none",
                 "data.features needs data held in memory; data.name=imagefolder decodes images on demand")
        _require(self.classes is None or (len(self.classes) >= 2 and len(set(self.classes)) == len(self.classes)
                                          and min(self.classes) >= 0),
                 f"data.classes must list at least 2 distinct labels >= 0, got {self.classes}")
        _require(self.std is None or all(s > 0 for s in self.std), f"data.std must be > 0, got {self.std}")
        _require(self.val_size >= 0, f"data.val_size must be >= 0, got {self.val_size}")
        _require(self.val_carve in ("stable", "permutation"),
                 f"data.val_carve must be stable or permutation, got {self.val_carve!r}")
        _require(-2**63 <= self.val_seed < 2**63, f"data.val_seed must fit in 64 bits (-2**63 <= seed < 2**63), "
                                                  f"got {self.val_seed}")
        _require(self.name != "npz" or bool(self.root), "data.name=npz needs data.root (a folder with train.npz)")


@dataclass(frozen=True)
class ModelConfig:
    name: str = "cnn_small"         # a name from dpwa.models.MODELS, or a timm NF model (dm_nfnet_f0, nf_resnet26, ...)
    # null: the model's own default, from its paper (wrn*: GroupNorm(16) and WS convs, De et al.;
    # scatter_cnn: GroupNorm(27) on the features, plain convs, Tramer & Boneh; cnn_*: 8 groups)
    groups: Optional[int] = None    # GroupNorm groups
    weight_standardization: Optional[bool] = None  # WS convs (Qiao et al. 2019)
    # NF models only (dpwa/models/nfnet.py): pretrained weights, a .safetensors or torch
    # state-dict file, or "cache" (timm's local Hugging Face cache; never downloaded). The
    # classifier head is re-initialised (zero) for the dataset's classes.
    pretrained: Optional[str] = None
    trainable: str = "all"          # all | head (private linear probe) | stages (head + last trainable_stages stages)
    trainable_stages: int = 0
    # How scatter_cnn normalises its input features: group (GroupNorm(groups) per example, free)
    # or private (per-channel statistics of the training features released by the statistics
    # mechanism, `feature_stats`; Tramer & Boneh 2021's private "BN", charged in the ledger).
    input_norm: str = "group"
    conv_norm: bool = False         # scatter_cnn: a GroupNorm(16) after each conv (what FiLM modulates)
    # FiLM-Ensemble (Turkoglu et al. 2022; dpwa/models/film.py): M >= 2 members, each affine
    # GroupNorm becomes GroupNorm(affine=False) + per-member FiLM; 0 = a single model. One
    # example is M rows, folded into one clipped gradient: the privacy cost of one model.
    film_members: int = 0
    film_gain: float = 1.0          # rho: members' gamma = 1 + U(-a, a), beta = U(-a, a), a = rho sqrt(6 / (M + C))

    def __post_init__(self) -> None:
        _require(self.groups is None or self.groups >= 1, f"model.groups must be >= 1 (or null), got {self.groups}")
        _require(self.film_members == 0 or self.film_members >= 2,
                 f"model.film_members must be 0 (a single model) or >= 2, got {self.film_members}")
        _require(self.film_gain >= 0, f"model.film_gain must be >= 0, got {self.film_gain}")
        if self.film_members < 2 and self.film_gain != 1.0:
            _unused("model.film_gain", self.film_gain, "model.film_members >= 2 (a FiLM-Ensemble)")
        _require(self.input_norm in ("group", "private"),
                 f"model.input_norm must be one of group, private; got {self.input_norm!r}")
        _require(self.trainable in ("all", "head", "stages"),
                 f"model.trainable must be one of all, head, stages; got {self.trainable!r}")
        _require(self.trainable != "stages" or self.trainable_stages >= 1,
                 f"model.trainable=stages needs model.trainable_stages >= 1, got {self.trainable_stages}")


@dataclass(frozen=True)
class AugmultConfig:
    k: int = 1                      # views per example; its gradient is the mean over them, clipped once
    pad: int = 4                    # reflect-pad then random crop back (De et al.: 4); 0 = no crop
    flip: bool = True               # random horizontal flip

    def __post_init__(self) -> None:
        _require(self.k >= 1, f"augmult.k must be >= 1, got {self.k}")
        _require(self.pad >= 0, f"augmult.pad must be >= 0, got {self.pad}")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = True                      # false: plain SGD, for data.public datasets only; no ledger
    epsilon: Optional[float] = None           # target epsilon: the noise is calibrated for it
    noise_multiplier: Optional[float] = None  # or the noise multiplier itself
    delta: float = 1e-5                       # below 1/N; refused at or above 1/N unless the next key says so
    # delta >= 1/N allows a mechanism that publishes one example outright with probability delta:
    # refused unless this is set (the name is the warning)
    accept_delta_above_1_over_n: bool = False
    clip_norm: float = 1.0                    # C: per-example gradients are clipped to this L2 norm
    rescale_to_unit: bool = False             # divide clipped gradients by C (De et al.)
    accountant: str = "prv"                   # rdp | prv | pld
    ledger: Optional[str] = None              # ledger file (default: $DPWA_LEDGER or ~/.dpwa/ledger.sqlite)
    noise_seed: Optional[int] = None          # TESTS ONLY: reproducible noise and batches; the run is marked not private
    # Per-example clipping engine (dpwa.engines): dpwa-fast | dpwa-lean (less memory) | torch-func | opacus-hooks |
    # opacus-functorch | opacus-ghost. Same guarantee; they differ in speed and memory.
    engine: str = "dpwa-fast"

    def __post_init__(self) -> None:
        _require(self.epsilon is None or self.noise_multiplier is None,
                 "give exactly one of privacy.epsilon (calibrate the noise) and privacy.noise_multiplier; "
                 f"got epsilon={self.epsilon}, noise_multiplier={self.noise_multiplier}")
        _require(self.epsilon is None or (math.isfinite(self.epsilon) and self.epsilon > 0),
                 f"privacy.epsilon must be finite and > 0, got {self.epsilon}")
        _require(self.noise_multiplier is None or (math.isfinite(self.noise_multiplier)
                                                   and self.noise_multiplier >= MIN_NOISE_MULTIPLIER),
                 f"privacy.noise_multiplier must be finite and >= {MIN_NOISE_MULTIPLIER:g} (the accountants' floor), "
                 f"got {self.noise_multiplier}")
        _require(0 < self.delta < 1, f"privacy.delta must be in (0, 1), got {self.delta}")
        _require(self.noise_seed is None or -2**63 <= self.noise_seed < 2**64 - 16,  # (noise_seed + 7, + 11)
                 f"privacy.noise_seed must be in [-2**63, 2**64 - 16) or null, got {self.noise_seed}")
        _require(self.clip_norm > 0, f"privacy.clip_norm must be > 0, got {self.clip_norm}")
        _known("privacy.engine", self.engine, "dpwa.engines", "ENGINES")
        _require(self.accountant in ("rdp", "prv", "pld"),
                 f"privacy.accountant must be one of rdp, prv, pld; got {self.accountant!r}")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer (`dpwa/optimizers.py`: sgd | adam | adamw | adambc | padam) and its lr schedule. Every field
    means one thing; fields of another optimizer or schedule than the chosen one must keep
    their defaults (refused otherwise, so a typo'd intent is not silently ignored)."""

    name: str = "sgd"               # sgd | adam | adamw | adambc | padam: applied to the mechanism's noisy gradient
    lr: float = 1.0
    weight_decay: float = 0.0       # sgd, adam: L2 added to the gradient; adamw, adambc, padam: decoupled
    momentum: float = 0.0           # sgd only
    nesterov: bool = False          # sgd only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam, adamw, adambc, padam
    eps: float = 1e-8               # adam, adamw, adambc, padam
    adambc_floor: float = 1e-8      # adambc: gamma, the floor of v_hat - (noise std)^2 (Tang et al.'s eps_root);
    #                                 absolute: keep it well below (sigma C / B)^2, or adambc is momentum SGD
    partial: float = 0.125          # padam: p in (0, 1/2], update m_hat / (v_hat^p + eps) (GadamX: 0.125)
    # constant | warmup | cosine | swa | cyclic | sgdr: pure functions of the step (dpwa/schedules.py)
    schedule: str = "constant"
    warmup_steps: int = 0
    final_lr_fraction: float = 0.0  # cosine decays to lr * this
    swa_lr: float = 0.0             # swa: the SWA lr, reached at 0.9 averaging.swa_start
    min_lr: float = 0.0             # cyclic, sgdr: the cycles' minimum
    cycle_start: int = 0            # cyclic, sgdr: steps at lr before the first cycle (FGE starts from a trained model)
    cycle_length: int = 0           # cyclic: steps per triangle (even; minimum at mid-cycle)
    sgdr_t0: int = 0                # sgdr: T_0, steps of the first cycle
    cycle_mult: int = 1             # sgdr: T_mult, cycle i lasts sgdr_t0 * cycle_mult^i steps

    def __post_init__(self) -> None:
        _known("optim.name", self.name, "dpwa.optimizers", "OPTIMIZERS")
        _known("optim.schedule", self.schedule, "dpwa.schedules", "SCHEDULES")
        _require(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _require(self.lr <= FLOAT32_MAX or math.isinf(self.lr),  # (inf: "must be finite", below)
                 f"optim.lr must fit in float32 (<= {FLOAT32_MAX:.4g}; the optimizer's step would overflow after a "
                 f"charged release), got {self.lr}")
        _require(not (math.isfinite(self.weight_decay) and math.isfinite(self.lr))  # (inf: "must be finite")
                 or self.weight_decay * max(self.lr, 1.0) <= FLOAT32_MAX,
                 f"optim.weight_decay (x optim.lr, where AdamW multiplies them) must fit in float32 "
                 f"(<= {FLOAT32_MAX:.4g}), got {self.weight_decay} (lr {self.lr})")
        _require(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1), got {self.momentum}")
        _require(self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        _require(self.name != "sgd" or (self.betas == [0.9, 0.999] and self.eps == 1e-8),
                 f"optim.betas / optim.eps are for adam, adamw, adambc, padam, not optim.name=sgd; got betas={self.betas}, "
                 f"eps={self.eps}")
        _require(self.name == "sgd" or (self.momentum == 0 and not self.nesterov),
                 f"optim.momentum / optim.nesterov are for sgd; optim.name={self.name} has optim.betas")
        _require(not self.nesterov or self.momentum > 0, "optim.nesterov=true needs optim.momentum > 0 (Nesterov "
                 f"momentum of momentum 0 is plain SGD), got optim.momentum={self.momentum}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
                 f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        _require(self.eps > 0, f"optim.eps must be > 0, got {self.eps}")
        _require(self.adambc_floor > 0, f"optim.adambc_floor must be > 0, got {self.adambc_floor}")
        _require(self.name == "adambc" or self.adambc_floor == 1e-8,
                 f"optim.adambc_floor is for optim.name=adambc, not {self.name!r}; got {self.adambc_floor}")
        _require(0 < self.partial <= 0.5, f"optim.partial must be in (0, 0.5], got {self.partial}")
        _require(self.name == "padam" or self.partial == 0.125,
                 f"optim.partial is for optim.name=padam, not {self.name!r}; got {self.partial}")
        _require(0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}], got {self.min_lr}")
        _require(0 <= self.swa_lr <= self.lr, f"optim.swa_lr must be in [0, optim.lr={self.lr}], got {self.swa_lr}")
        _require(self.cycle_start >= 0, f"optim.cycle_start must be >= 0, got {self.cycle_start}")
        _require(self.cycle_mult >= 1, f"optim.cycle_mult must be >= 1, got {self.cycle_mult}")
        _require(self.schedule != "cyclic" or self.cycle_length >= 1,
                 f"optim.schedule=cyclic needs optim.cycle_length >= 1, got {self.cycle_length}")
        _require(self.schedule != "sgdr" or self.sgdr_t0 >= 1,
                 f"optim.schedule=sgdr needs optim.sgdr_t0 (T_0) >= 1, got {self.sgdr_t0}")
        _require(self.schedule != "sgdr" or self.sgdr_t0 >= 2 or self.cycle_mult > 1,
                 "optim.sgdr_t0=1 with optim.cycle_mult=1 makes every step a one-step cycle at optim.min_lr; "
                 "use sgdr_t0 >= 2 or cycle_mult > 1")
        for key, value, owner in (("swa_lr", self.swa_lr, ("swa",)), ("min_lr", self.min_lr, ("cyclic", "sgdr")),
                                  ("cycle_length", self.cycle_length, ("cyclic",)), ("sgdr_t0", self.sgdr_t0, ("sgdr",)),
                                  ("cycle_mult", self.cycle_mult - 1, ("sgdr",)),
                                  ("cycle_start", self.cycle_start, ("cyclic", "sgdr")),
                                  ("warmup_steps", self.warmup_steps, ("warmup", "cosine", "swa", "cyclic", "sgdr")),
                                  ("final_lr_fraction", self.final_lr_fraction, ("cosine",))):
            _require(not value or self.schedule in owner,
                     f"optim.{key} is for optim.schedule={' / '.join(owner)}, not {self.schedule!r}")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        _require(0 <= self.final_lr_fraction <= 1,
                 f"optim.final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")


@dataclass(frozen=True)
class FeatureStatsConfig:
    """The statistics mechanism of `model.input_norm: private` (dpwa/statistics.py): two
    Gaussian releases on the full training set, composed with the DP-SGD steps in the ledger
    (the DP-SGD noise is calibrated so that both together meet privacy.epsilon). The clip
    bounds are hyper-parameters, not statistics of the data (Tramer & Boneh's median is an
    unaccounted release)."""

    noise_multiplier: float = 8.0   # sigma of both releases (Tramer & Boneh: 8)
    mean_clip: float = 1.0          # L2 bound on each example's vector of per-channel means
    second_moment_clip: float = 1.0  # L2 bound on each example's vector of per-channel mean squares

    def __post_init__(self) -> None:
        for key in ("noise_multiplier", "mean_clip", "second_moment_clip"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value > 0, f"feature_stats.{key} must be > 0, got {value}")
        _require(self.noise_multiplier >= MIN_NOISE_MULTIPLIER, f"feature_stats.noise_multiplier must be >= "
                 f"{MIN_NOISE_MULTIPLIER:g} (the accountants' floor), got {self.noise_multiplier}")


ENDPOINT_MODELS = ("raw", "ema", "polyak", "swa")  # the single-weight models of a run, for curve endpoints
SPARSE_METHODS = ("set", "rigl", "edst", "suptickets")  # on dpwa.sparsity masks: they own method.sparsity_*
TICKET_METHODS = ("edst", "suptickets")  # sparse methods that collect tickets by schedule: they own method.tickets_grow


@dataclass(frozen=True)
class MethodConfig:
    """The training method (`dpwa/methods/`): how a run turns noisy releases into iterates.
    dpsgd: one release per step, applied by the optimizer (Abadi et al. 2016). dpsat: DP-SAT
    (Park et al. 2023), the same releases taken at weights moved rho along the previous one.
    pswa: DP-SGD restarted from the running average of its iterates every pswa_period steps
    (Guo, Jin & Liu 2022); the same releases. entropy_sgd: Entropy-SGD (Chaudhari et al. 2017),
    inner_steps Langevin steps per step, each one release. curve: a Bezier or PolyChain curve
    between two released runs (Garipov et al. 2018), one release per step at a point w(t) of
    the curve, t public. set / rigl: dynamic sparse training (Mocanu et al. 2018 / Evci et al.
    2020; dpwa/sparsity.py), DP-SGD on masked weights whose masks move by schedule, growth at
    random or by released gradients; the releases of DP-SGD. edst: FreeTickets' EDST ensemble
    (Liu et al. 2022), an exploration, then edst_phases refinement phases each ending in a ticket,
    with a large topology jump between phases. suptickets: Sup-tickets (Yin et al. 2022), a sparse
    phase, then cosine lr cycles each ending in a ticket, the tickets' average pruned back to the
    budget. Both: the releases of DP-SGD, tickets by schedule. A field of another method than the
    chosen one must keep its default (refused otherwise)."""

    name: str = "dpsgd"
    rho: float = 0.0                # dpsat: the ascent radius (Park et al.: 0.03 at lr 2)
    pswa_start: int = 0             # pswa: steps of plain DP-SGD before the running average collects
    pswa_period: int = 40           # pswa: P, restart from the average every P steps after pswa_start
    pswa_restarts: int = 0          # pswa: 0: restart every period (PSWA); 1: DSWA, 2: TSWA (then average to the end)
    inner_steps: int = 20           # entropy_sgd: L, Langevin steps (= releases) per step (Chaudhari et al.: 20)
    inner_lr: float = 0.1           # entropy_sgd: eta', the Langevin step size (the reference's fixed 0.1)
    inner_momentum: float = 0.9     # entropy_sgd: Nesterov momentum of the Langevin steps, zeroed each step
    gamma: float = 0.03             # entropy_sgd: gamma_0, the coupling ("scope"; Lua README CIFAR: 0.03)
    scoping: float = 1e-3           # entropy_sgd: gamma_t = gamma (1 + scoping)^(t + 1)
    langevin_noise: float = 0.0     # entropy_sgd: extra thermal noise epsilon on top of the DP noise (0: none)
    mean_decay: float = 0.75        # entropy_sgd: beta_1 of the Gibbs-mean estimate mu <- b mu + (1 - b) x'
    curve_type: str = "bezier"      # curve: bezier (Bernstein coefficients) | polychain (a broken line)
    curve_bends: int = 1            # curve: trained control points between the two fixed endpoints
    curve_endpoints: list[str] = field(default_factory=list)  # curve: [RUN_DIR_A, RUN_DIR_B], two run folders
    # curve: which released model of each endpoint run: raw (last iterate) | ema | polyak | swa
    curve_endpoint_models: list[str] = field(default_factory=lambda: ["raw", "raw"])
    sparsity_density: float = 0.2   # set, rigl: active fraction of the masked weights (0.2: 80% sparse)
    sparsity_init: str = "erk"      # set, rigl: per-layer densities: erk (Erdos-Renyi-Kernel) | uniform
    sparsity_classifier: bool = False  # set, rigl: mask the final classifier too (default: it stays dense)
    sparsity_update_every: int = 100   # set, rigl: Delta-T, steps between mask updates (RigL: 100)
    sparsity_fraction: float = 0.3  # set, rigl: alpha, the drop fraction, cosine-decayed to 0 at sparsity_end
    sparsity_end: int = 0           # set, rigl: T_end, the step from which masks stay fixed (RigL: 75% of steps)
    # GraNet's dense-to-sparse start (Liu et al. 2021; dpwa/sparsity.py): the initial masks' density
    # (1: dense), pruned by global magnitude to sparsity_density along the cubic schedule over steps
    # (sparsity_prune_start, sparsity_prune_end], every sparsity_update_every; null: masks start at the budget
    sparsity_init_density: Optional[float] = None
    sparsity_prune_start: int = 0
    sparsity_prune_end: int = 0
    # rigl: regrow by |the update step's own released gradient| (dense_noisy) or by |the momentum of
    # the released gradients| (momentum: better signal to noise; needs optim.momentum or beta1 > 0)
    rigl_grow: str = "dense_noisy"
    # edst, suptickets: regrowth (routine updates and jumps) at random (SET) or by a released gradient
    # as method.rigl_grow: random | dense_noisy | momentum (FreeTickets' and Sup-tickets' --growth)
    tickets_grow: str = "dense_noisy"
    edst_exploration: int = 0       # edst: steps of exploration (the schedule's lr) before the first refinement phase
    edst_phases: int = 3            # edst: M, refinement phases, each ending in a ticket (FreeTickets: 3)
    edst_phase_steps: int = 0       # edst: steps per refinement phase; train.steps = exploration + M x this
    edst_jump: float = 0.8          # edst: drop/grow fraction at the start of phases 2..M (FreeTickets' large death rate)
    # edst: lr of a refinement phase's first and second half, as fractions of optim.lr (FreeTickets: 0.01, 0.001 at 0.1)
    edst_lr_fractions: list[float] = field(default_factory=lambda: [0.1, 0.01])
    suptickets_start: int = 0       # suptickets: steps of the sparse phase (the schedule's lr) before the cycles
    suptickets_cycles: int = 3      # suptickets: cycles, each ending in a ticket at its lowest lr (README: 3)
    suptickets_cycle_length: int = 0  # suptickets: steps per cycle; train.steps = start + cycles x this
    suptickets_jump: float = 0.5    # suptickets: drop/grow fraction at each cycle start (re-exploration; 0: none)
    # suptickets: the cosine of each cycle, from the first to the second fraction of optim.lr (README: 0.005 -> 0.001 at 0.1)
    suptickets_lr_fractions: list[float] = field(default_factory=lambda: [0.05, 0.01])
    suptickets_from_start: bool = True  # suptickets: the iterate at suptickets_start is the average's first member (CAA)

    def __post_init__(self) -> None:
        _known("method.name", self.name, "dpwa.methods", "METHODS")
        _require(math.isfinite(self.rho) and self.rho >= 0, f"method.rho must be >= 0, got {self.rho}")
        _require(self.name != "dpsat" or self.rho > 0, "method.name=dpsat needs method.rho > 0 (Park et al.: 0.03 at "
                 "lr 2); at method.rho=0 it is DP-SGD: method.name=dpsgd")
        _require(self.pswa_start >= 0, f"method.pswa_start must be >= 0, got {self.pswa_start}")
        _require(self.pswa_period >= 1, f"method.pswa_period must be >= 1, got {self.pswa_period}")
        _require(self.pswa_restarts >= 0, f"method.pswa_restarts must be >= 0, got {self.pswa_restarts}")
        _require(self.inner_steps >= 1, f"method.inner_steps must be >= 1, got {self.inner_steps}")
        _require(math.isfinite(self.inner_lr) and self.inner_lr > 0, f"method.inner_lr must be > 0, got {self.inner_lr}")
        _require(0 <= self.inner_momentum < 1, f"method.inner_momentum must be in [0, 1), got {self.inner_momentum}")
        for key in ("gamma", "scoping", "langevin_noise"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, f"method.{key} must be >= 0, got {value}")
        _require(0 <= self.mean_decay < 1, f"method.mean_decay must be in [0, 1), got {self.mean_decay}")
        _known("method.curve_type", self.curve_type, "dpwa.methods.curve", "CURVES")
        _require(self.curve_bends >= 1, f"method.curve_bends must be >= 1 (0 bends is the segment, evaluated for "
                 f"free by `dpwa curve --eval`), got {self.curve_bends}")
        _require(self.name != "curve" or (len(self.curve_endpoints) == 2 and all(self.curve_endpoints)),
                 f"method.name=curve needs method.curve_endpoints=[RUN_DIR_A, RUN_DIR_B], got {self.curve_endpoints}")
        _require(len(self.curve_endpoint_models) == 2 and set(self.curve_endpoint_models) <= set(ENDPOINT_MODELS),
                 f"method.curve_endpoint_models must be two of {', '.join(ENDPOINT_MODELS)} (one per endpoint), "
                 f"got {self.curve_endpoint_models}")
        _require(0 < self.sparsity_density < 1, f"method.sparsity_density must be in (0, 1) (1 is dense: "
                 f"method.name=dpsgd), got {self.sparsity_density}")
        _known("method.sparsity_init", self.sparsity_init, "dpwa.sparsity", "DENSITIES")
        _require(self.sparsity_update_every >= 1,
                 f"method.sparsity_update_every must be >= 1, got {self.sparsity_update_every}")
        _require(0 < self.sparsity_fraction <= 1, f"method.sparsity_fraction must be in (0, 1], got {self.sparsity_fraction}")
        _require(self.sparsity_end >= 0, f"method.sparsity_end must be >= 0, got {self.sparsity_end}")
        _require(self.name not in SPARSE_METHODS or self.sparsity_end >= 1,
                 f"method.name={self.name} needs method.sparsity_end >= 1: the step from which the masks stay fixed, "
                 f"where the drop fraction's cosine reaches 0 (RigL: 75% of the steps); got {self.sparsity_end}")
        if self.name not in SPARSE_METHODS:
            pass  # its sparsity_* fields are refused below unless they keep their defaults
        elif self.sparsity_init_density is None:
            _require(self.sparsity_prune_start == 0 and self.sparsity_prune_end == 0,
                     f"method.sparsity_prune_start / _end schedule the pruning from method.sparsity_init_density, "
                     f"which is null (masks start at the budget); got {self.sparsity_prune_start}, "
                     f"{self.sparsity_prune_end}")
        else:
            _require(self.sparsity_density < self.sparsity_init_density <= 1,
                     f"method.sparsity_init_density must be in (method.sparsity_density, 1] = "
                     f"({self.sparsity_density}, 1] (the pruning goes down to the budget); got {self.sparsity_init_density}")
            _require(0 <= self.sparsity_prune_start < self.sparsity_prune_end,
                     f"method.sparsity_init_density={self.sparsity_init_density} needs 0 <= method.sparsity_prune_start "
                     f"< method.sparsity_prune_end (the steps over which the density falls to the budget); got "
                     f"{self.sparsity_prune_start}, {self.sparsity_prune_end}")
            for owner, key in (("edst", "edst_exploration"), ("suptickets", "suptickets_start")):
                _require(self.name != owner or self.sparsity_prune_end <= getattr(self, key),
                         f"method.name={owner} collects tickets at the budget's density: method.sparsity_prune_end "
                         f"must be <= method.{key} = {getattr(self, key)}; got {self.sparsity_prune_end}")
        _require(self.rigl_grow in ("dense_noisy", "momentum"),
                 f"method.rigl_grow must be one of dense_noisy, momentum; got {self.rigl_grow!r}")
        _require(self.tickets_grow in ("random", "dense_noisy", "momentum"),
                 f"method.tickets_grow must be one of random, dense_noisy, momentum; got {self.tickets_grow!r}")
        _require(self.tickets_grow == "dense_noisy" or self.name in TICKET_METHODS,
                 f"method.tickets_grow is for method.name={' / '.join(TICKET_METHODS)}, not {self.name!r}; "
                 f"got {self.tickets_grow}")
        for key in ("edst_exploration", "edst_phase_steps", "suptickets_start", "suptickets_cycles"):
            _require(getattr(self, key) >= 0, f"method.{key} must be >= 0, got {getattr(self, key)}")
        _require(self.name != "edst" or (self.edst_exploration >= 1 and self.edst_phase_steps >= 1
                                         and self.edst_phases >= 1),
                 f"method.name=edst needs method.edst_exploration >= 1, method.edst_phases >= 1 and "
                 f"method.edst_phase_steps >= 1 (train.steps = exploration + phases x phase_steps); got "
                 f"{self.edst_exploration}, {self.edst_phases}, {self.edst_phase_steps}")
        _require(0 < self.edst_jump <= 1, f"method.edst_jump must be in (0, 1], got {self.edst_jump}")
        _require(self.name != "suptickets" or (self.suptickets_start >= 1 and self.suptickets_cycles >= 1
                                               and self.suptickets_cycle_length >= 2),
                 f"method.name=suptickets needs method.suptickets_start >= 1, method.suptickets_cycles >= 1 and "
                 f"method.suptickets_cycle_length >= 2 (train.steps = start + cycles x cycle_length); got "
                 f"{self.suptickets_start}, {self.suptickets_cycles}, {self.suptickets_cycle_length}")
        _require(0 <= self.suptickets_jump <= 1, f"method.suptickets_jump must be in [0, 1], got {self.suptickets_jump}")
        for key in ("edst_lr_fractions", "suptickets_lr_fractions"):
            value = getattr(self, key)
            _require(len(value) == 2 and all(math.isfinite(v) and v > 0 for v in value),
                     f"method.{key} must be two fractions of optim.lr, both > 0; got {value}")
        _require(self.suptickets_lr_fractions[0] >= self.suptickets_lr_fractions[1],
                 f"method.suptickets_lr_fractions are the cycles' [start, end] lr (a cosine down to the ticket): "
                 f"the first must be >= the second; got {self.suptickets_lr_fractions}")
        _require(self.edst_lr_fractions[0] >= self.edst_lr_fractions[1],
                 f"method.edst_lr_fractions are the lr of a phase's [first, second] half, and its last iterate is a "
                 f"ticket taken at the phase's lowest lr (FreeTickets): the first must be >= the second; got "
                 f"{self.edst_lr_fractions}")
        for key in ("sparsity_density", "sparsity_init", "sparsity_classifier", "sparsity_update_every",
                    "sparsity_fraction", "sparsity_end", "sparsity_init_density", "sparsity_prune_start",
                    "sparsity_prune_end"):
            _require(getattr(self, key) == self.__dataclass_fields__[key].default or self.name in SPARSE_METHODS,
                     f"method.{key} is for method.name={' / '.join(SPARSE_METHODS)}, not {self.name!r}; "
                     f"got {getattr(self, key)}")
        owners = {"rho": "dpsat", "rigl_grow": "rigl",
                  **dict.fromkeys(("pswa_start", "pswa_period", "pswa_restarts"), "pswa"),
                  **dict.fromkeys(("inner_steps", "inner_lr", "inner_momentum", "gamma", "scoping", "langevin_noise",
                                   "mean_decay"), "entropy_sgd"),
                  **dict.fromkeys(("curve_type", "curve_bends", "curve_endpoints", "curve_endpoint_models"), "curve"),
                  **dict.fromkeys(("edst_exploration", "edst_phases", "edst_phase_steps", "edst_jump",
                                   "edst_lr_fractions"), "edst"),
                  **dict.fromkeys(("suptickets_start", "suptickets_cycles", "suptickets_cycle_length", "suptickets_jump",
                                   "suptickets_lr_fractions", "suptickets_from_start"), "suptickets")}
        for key, owner in owners.items():
            f = self.__dataclass_fields__[key]
            default = f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]
            _require(getattr(self, key) == default or self.name == owner,
                     f"method.{key} is for method.name={owner}, not {self.name!r}; got {getattr(self, key)}")


@dataclass(frozen=True)
class AveragingConfig:
    """Averages and ensembles of the iterates (dpwa/averaging.py): all post-processing, free.
    Iterates are collected by schedule only, never by a metric on private data."""

    ema_decay: float = 0.999        # EMA of the iterates; warm-up decay_t = min(decay, (1+t)/(10+t))
    ema_warmup: bool = True
    polyak_start: int = 0           # uniform average of the iterates after this many steps
    swa: bool = False               # SWA: uniform average of the iterates collected after swa_start
    swag: bool = False              # SWAG: moments of the same iterates (needs no swa: true)
    swa_start: int = 0              # steps before SWA / SWAG collect
    swa_every: int = 0              # collect every this many steps; 0: at each lr minimum of a cyclic / sgdr schedule
    snapshots: bool = False         # FGE / SGDR snapshot ensemble: the iterate at each lr minimum (cyclic / sgdr)
    swag_rank: int = 20             # K, columns of SWAG's deviation matrix (Maddox et al.: 20)
    swag_scale: float = 0.5         # samples theta = mean + sqrt(scale) (diag_std z1 + D z2 / sqrt(K - 1)); swag_diag: mean + diag_std z1
    swag_samples: int = 30          # models drawn for Bayesian model averaging at evaluation

    def __post_init__(self) -> None:
        _require(0 <= self.ema_decay < 1, f"averaging.ema_decay must be in [0, 1), got {self.ema_decay}")
        _require(self.polyak_start >= 0, f"averaging.polyak_start must be >= 0, got {self.polyak_start}")
        _require(self.swa_start >= 0, f"averaging.swa_start must be >= 0, got {self.swa_start}")
        _require(self.swa_every >= 0, f"averaging.swa_every must be >= 0, got {self.swa_every}")
        _require(self.swag_rank >= 2, f"averaging.swag_rank must be >= 2 (SWAG divides by K - 1), "
                 f"got {self.swag_rank}")
        _require(self.swag_scale > 0, f"averaging.swag_scale must be > 0, got {self.swag_scale}")
        _require(self.swag_samples >= 1, f"averaging.swag_samples must be >= 1, got {self.swag_samples}")
        if self.swa_every and not (self.swa or self.swag):
            _unused("averaging.swa_every", self.swa_every, "averaging.swa or averaging.swag")
        for key, default in (("swag_rank", 20), ("swag_scale", 0.5), ("swag_samples", 30)):
            if not self.swag and getattr(self, key) != default:
                _unused(f"averaging.{key}", getattr(self, key), "averaging.swag=true")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 256           # expected logical batch B; Poisson sampling with q = B/N
    physical_batch_size: int = 64   # examples per forward/backward (x augmult.k views); fits memory
    steps: Optional[int] = None     # DP-SGD steps; or
    epochs: Optional[float] = None  # passes over the data: steps = ceil(epochs * N / B)
    seed: int = 0                   # model init, sampling and augmentation
    # torch CPU threads: auto (the cores this process may use, less those busy elsewhere, per
    # local rank: dpwa.threads) or a number
    threads: int | str = "auto"
    eval_every: int = 0             # steps between evaluations (0: at the end only)
    checkpoint_every: int = 50      # steps between checkpoints (and ledger progress)
    eval_split: str = "test"        # test | val: where accuracy is measured (never private train data)
    # eval_split=val on private data: the std of each released validation accuracy, a noisy
    # count charged to the ledger with the run (dpwa.validation); 0: exact, with NLL, ECE and
    # Brier, but not covered by the DP guarantee (warns)
    val_noise: float = 0.01
    device: str = "cpu"             # cpu | cuda | cuda:N | auto (cuda when available)
    # torchrun runs (WORLD_SIZE > 1): process-group backend (auto: nccl on GPUs, gloo on CPUs)
    # and how long a collective waits for a silent rank before the run fails
    dist_backend: str = "auto"
    dist_timeout_s: float = 600.0
    # also write each metrics row as TensorBoard scalars to RUN_DIR/tensorboard (needs the
    # optional `tensorboard` package; refused before any charge when it is missing)
    tensorboard: bool = False
    # write each private batch's mean loss and realised size to metrics.jsonl, TensorBoard,
    # curves.png and the progress bar: not covered by the DP guarantee (an evaluation on private
    # training data; the size tells the secret sampling), for local debugging only (warns)
    private_diagnostics: bool = False
    # DataLoader worker processes that decode data.name=imagefolder images, the next Poisson
    # batch while a step runs (dpwa.loader); 0: in the training process. Same batches, same views.
    workers: int = 0
    # glibc only: blocks under this many MB come from the heap and freed ones stay for the next
    # step instead of fresh zeroed pages each time (dpwa.alloc); 0: glibc's dynamic thresholds
    retain_freed_mb: int = 1024

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1, got {self.batch_size}")
        _require(self.workers >= 0, f"train.workers must be >= 0 (0: decode in the training process), "
                                    f"got {self.workers}")
        retain_error = limit_error(self.retain_freed_mb)
        _require(retain_error is None, str(retain_error))
        _require(self.physical_batch_size >= 1,
                 f"train.physical_batch_size must be >= 1, got {self.physical_batch_size}")
        _require(self.steps is None or self.epochs is None,
                 f"give only one of train.steps and train.epochs; got steps={self.steps}, epochs={self.epochs}")
        _require(self.steps is None or self.steps >= 1, f"train.steps must be >= 1, got {self.steps}")
        _require(self.epochs is None or self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _require(self.threads == "auto" or (str(self.threads).isdigit() and int(self.threads) >= 1),
                 f"train.threads must be auto or an integer >= 1, got {self.threads!r}")
        if isinstance(self.threads, str) and self.threads != "auto":
            object.__setattr__(self, "threads", int(self.threads))  # "4" in YAML quotes
        _require(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}")
        _require(self.checkpoint_every >= 1, f"train.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        _require(self.eval_split in ("test", "val"), f"train.eval_split must be test or val, got {self.eval_split!r}")
        _require(math.isfinite(self.val_noise) and (self.val_noise == 0 or self.val_noise >= MIN_NOISE_MULTIPLIER),
                 f"train.val_noise must be 0 or a finite number >= {MIN_NOISE_MULTIPLIER:g} (the std of a released "
                 f"validation accuracy; 0: exact, outside the DP guarantee), got {self.val_noise}")
        _require(self.device in ("cpu", "cuda", "auto") or self.device.startswith("cuda:"),
                 f"train.device must be cpu, cuda, cuda:N or auto; got {self.device!r}")
        _require(self.dist_backend in ("auto", "gloo", "nccl"),
                 f"train.dist_backend must be auto, gloo or nccl; got {self.dist_backend!r}")
        _require(self.dist_timeout_s > 0, f"train.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        # seeds torch.manual_seed and the public sampling generator (seed + 1): what torch takes
        # (-2**63 .. 2**64 - 1), with room for the offsets
        _require(-2**63 <= self.seed < 2**64 - 16, f"train.seed must be in [-2**63, 2**64 - 16), got {self.seed}")


@dataclass(frozen=True)
class RunConfig:
    version: int = 2                # of this schema; config.yaml files without it are version 1 (migrated on read)
    name: str = "run"               # prefix of the run id and folder
    out_dir: str = "runs"           # run folders go here
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    augmult: AugmultConfig = field(default_factory=AugmultConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    feature_stats: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)

    def __post_init__(self) -> None:
        for section in fields(self):
            value = getattr(self, section.name)
            if is_dataclass(value):
                _require_finite(section.name, value)
        _require(self.privacy.enabled or self.data.public,
                 f"privacy.enabled=false on data.name={self.data.name!r}, which is not marked public: a private "
                 "dataset is only ever trained with DP (set data.public=true only for data that needs no privacy)")
        _require(not self.privacy.enabled or self.privacy.epsilon is not None
                 or self.privacy.noise_multiplier is not None,
                 "give privacy.epsilon (the noise is calibrated for it) or privacy.noise_multiplier")
        _require(self.train.steps is not None or self.train.epochs is not None,
                 "give train.steps (DP-SGD steps) or train.epochs (passes over the data)")
        _require(bool(self.name.strip()) and "/" not in self.name, f"name must be a plain word, got {self.name!r}")
        # the run folder is NAME-YYYYmmdd-HHMMSS-xxxxxxxx (25 more bytes): a name the file system
        # cannot hold failed at the folder, after the reservation
        _require(len(self.name.encode()) <= 200, f"name must be at most 200 bytes (the run folder's name "
                 f"appends 25 to it), got {len(self.name.encode())}: {self.name[:40]!r}...")
        _require(self.train.eval_split != "val" or self.data.val_size > 0,
                 "train.eval_split=val needs data.val_size > 0")
        _require(self.privacy.engine != "opacus-ghost" or self.augmult.k == 1,
                 f"privacy.engine=opacus-ghost clips every augmented view separately, so augmult.k={self.augmult.k} "
                 "is not allowed with it; use privacy.engine=dpwa-fast")
        _require(self.train.workers == 0 or self.data.name == "imagefolder",
                 f"train.workers={self.train.workers} decodes image files in worker processes; "
                 f"data.name={self.data.name!r} is held in memory, there is nothing to decode: use train.workers=0")
        _require(self.data.features == "none" or self.augmult.k == 1,
                 f"augmult.k={self.augmult.k} with data.features={self.data.features}: features are computed once "
                 "from the unaugmented images, so augmentation multiplicity is not available; set augmult.k=1")

        _require(self.model.input_norm != "private" or self.privacy.enabled,
                 "model.input_norm=private releases statistics of private data; with privacy.enabled=false use "
                 "model.input_norm=group")
        _require(self.feature_stats == FeatureStatsConfig() or self.model.input_norm == "private",
                 "feature_stats.* configures the release of model.input_norm=private; set it or drop feature_stats")

        beta = self.optim.momentum if self.optim.name == "sgd" else self.optim.betas[0]
        _require(self.method.name != "rigl" or self.method.rigl_grow != "momentum" or beta > 0,
                 f"method.rigl_grow=momentum ranks by the momentum of the released gradients, and optim.name="
                 f"{self.optim.name} has none (momentum / beta1 = {beta}): set optim.momentum > 0 (sgd) or use "
                 "method.rigl_grow=dense_noisy")
        _require(self.method.name != "entropy_sgd" or self.optim.name != "adambc",
                 "optim.name=adambc subtracts the noise variance of one release from Adam's second moment, and "
                 "method.name=entropy_sgd's outer step is gamma (x - mu), a mean of inner_steps releases whose noise "
                 "is not that: use optim.name=adamw (or sgd)")
        _require(self.method.name not in TICKET_METHODS or self.method.tickets_grow != "momentum" or beta > 0,
                 f"method.tickets_grow=momentum ranks by the momentum of the released gradients, and optim.name="
                 f"{self.optim.name} has none (momentum / beta1 = {beta}): set optim.momentum > 0 (sgd) or use "
                 "method.tickets_grow=dense_noisy or random")
        cyclical = self.optim.schedule in ("cyclic", "sgdr")
        _require(not self.averaging.snapshots or cyclical,
                 f"averaging.snapshots takes the iterate at each lr minimum of a cyclic schedule; set "
                 f"optim.schedule=cyclic (FGE) or sgdr, not {self.optim.schedule!r}")
        _require(not (self.averaging.swa or self.averaging.swag) or self.averaging.swa_every > 0 or cyclical,
                 f"averaging.swa_every=0 collects at the lr minima of a cyclic schedule, and optim.schedule="
                 f"{self.optim.schedule!r} has none: set averaging.swa_every >= 1 or optim.schedule=cyclic / sgdr")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _merge(sources: Sequence[Any]) -> RunConfig:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), *sources)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + _where(e)) from None
    except ValueError as e:  # __post_init__ checks surface through OmegaConf
        raise ConfigError(str(e).splitlines()[0]) from None


def _where(e: Any) -> str:
    key = getattr(e, "full_key", None)
    return f" (key: {key})" if key else ""


def _mapping(node: Any, key: str) -> Any:
    """`node[key]` when both are config mappings, else None (a malformed file is left to `_merge`)."""
    from omegaconf import DictConfig

    child = node.get(key) if isinstance(node, DictConfig) else None
    return child if isinstance(child, DictConfig) else None


# paths a config may give relative to where it is read: (section, key, values that are no path)
_PATHS = (("data", "root", ()), ("model", "pretrained", ("cache",)))


def _root_from(source: Any, base: Path) -> None:
    """Make a relative `data.root` or `model.pretrained` of `source` absolute, read from
    `base`: the config file's folder for a file, the current directory for command-line
    overrides. Absolute and `~` paths stay as written. The resolved (absolute) path is what
    the run folder's config.yaml keeps, so `--resume` finds the data and the weights (and the
    run folder they came from) from any directory."""
    import os

    from omegaconf import OmegaConf

    for section, key, words in _PATHS:
        node = _mapping(source, section)
        if node is None or key not in node:
            continue
        value = OmegaConf.to_container(node, resolve=False).get(key)
        if (isinstance(value, str) and value and value not in words and not value.startswith("~")
                and "${" not in value and not os.path.isabs(value)):
            node[key] = os.path.normpath(os.path.join(os.path.abspath(base), value))


def _one_run_length(file_source: Any, cli_source: Any) -> None:
    """`train.steps=N` on the command line replaces a run length the file gives as
    `train.epochs` (and `train.epochs=E` one given as `train.steps`): the file's other key is
    cleared. Both on the command line (or both in the file) stay an error."""
    file_train, cli_train = _mapping(file_source, "train"), _mapping(cli_source, "train")
    if file_train is None or cli_train is None:
        return
    for given, other in (("steps", "epochs"), ("epochs", "steps")):
        if cli_train.get(given) is not None and other not in cli_train and file_train.get(other) is not None:
            file_train[other] = None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Defaults <- YAML file <- `key.sub=value` overrides, validated.

    A relative `data.root` or `model.pretrained` is read from the config file's folder when
    the file sets it, and from the current directory when an override sets it; either way it
    is stored absolute.
    `train.steps` as an override clears the file's `train.epochs`, and vice versa.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types, out-of-range values.
    """
    from omegaconf import OmegaConf

    sources = []
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"Config file {path} is a folder; give a YAML file (e.g. {path / 'quickstart.yaml'})")
        if not path.is_file():
            raise ConfigError(f"Config file {path} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml.YAMLError and friends: say which file
            raise ConfigError(f"Cannot parse {path}: {str(e).splitlines()[0]}") from None
        if not isinstance(loaded, type(OmegaConf.create({}))):
            raise ConfigError(f"{path} must hold a mapping of config keys, not a list")
        _root_from(loaded, path.parent)
        sources.append(loaded)
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"Override {item!r} is not of the form key.sub=value")
    if overrides:
        try:
            cli = OmegaConf.from_dotlist(list(overrides))
        except Exception as e:
            raise ConfigError(f"Bad override: {str(e).splitlines()[0]}") from None
        _root_from(cli, Path.cwd())
        if sources:
            _one_run_length(sources[0], cli)
        sources.append(cli)
    return _merge(sources)


def config_to_yaml(cfg: RunConfig) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


CONFIG_VERSION = 2


def _migrate(tree: dict[str, Any]) -> dict[str, Any]:
    """A version-1 config (before the optimizer registry): `optim.min_lr` meant the SWA lr under
    the swa schedule and `optim.cycle_length` meant T_0 under sgdr."""
    version = tree.get("version", 1)
    if version == CONFIG_VERSION:
        return tree
    if version != 1:
        raise ConfigError(f"config version {version} is newer than this dpwa (reads up to {CONFIG_VERSION})")
    optim = dict(tree.get("optim") or {})
    schedule = optim.get("schedule", "constant")
    if schedule == "swa":
        optim["swa_lr"] = optim.pop("min_lr", 0.0)
    if schedule == "sgdr":
        optim["sgdr_t0"] = optim.pop("cycle_length", 0)
    for key, default in (("min_lr", 0.0), ("cycle_length", 0), ("cycle_start", 0), ("cycle_mult", 1)):
        owners = {"min_lr": ("cyclic", "sgdr"), "cycle_length": ("cyclic",), "cycle_start": ("cyclic", "sgdr"),
                  "cycle_mult": ("sgdr",)}[key]
        if schedule not in owners and key in optim:
            optim[key] = default  # version 1 kept unused fields; they meant nothing
    return {**tree, "optim": optim, "version": CONFIG_VERSION}


def config_from_yaml_text(text: str) -> RunConfig:
    """A run folder's config.yaml (any version) as a current `RunConfig`."""
    from omegaconf import OmegaConf

    tree = OmegaConf.to_container(OmegaConf.create(text))
    if not isinstance(tree, dict):
        raise ConfigError("config.yaml must hold a mapping of config keys")
    train, data = tree.get("train"), tree.get("data")
    if isinstance(train, dict) and "val_noise" not in train:  # written whole by a dpwa before charged validation
        tree = {**tree, "train": {**train, "val_noise": 0.0}}  # it evaluated exactly, and reserved no accuracies
    if isinstance(data, dict) and "val_carve" not in data:  # ... before the stable carve: it trained on the
        tree = {**tree, "data": {**data, "val_carve": "permutation"}}  # split a seeded shuffle carved
        data = tree["data"]
    if isinstance(data, dict) and "val_seed" not in data:  # ... before data.val_seed: carved with train.seed
        seed = train.get("seed", 0) if isinstance(train, dict) and data.get("val_size") else 0
        tree = {**tree, "data": {**data, "val_seed": seed}}
    return _merge([OmegaConf.create(_migrate(tree))])
