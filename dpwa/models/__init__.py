"""Model registry: `create_model(name, ...)`; `register_model` adds one.

Every model here normalises with GroupNorm: BatchNorm mixes the examples of a batch, which
breaks per-example gradients and so DP-SGD; `check_dp_compatible` refuses it.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Mapping, Optional

import torch.nn as nn

from ..config import ConfigError

__all__ = ["MODELS", "register_model", "create_model", "check_dp_compatible", "ModelError", "resolved_model_config"]

MODELS: dict[str, Callable[..., nn.Module]] = {}


class ModelError(ConfigError):
    """The model cannot be trained with DP-SGD (the message says why and what to use)."""


def register_model(name: str):
    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS:
            raise ValueError(f"Model {name!r} is registered twice")
        MODELS[name] = fn
        return fn
    return wrap


def create_model(name: str, *, in_channels: int, num_classes: int, groups: Optional[int] = None,
                 weight_standardization: Optional[bool] = None, pretrained: Optional[str] = None, trainable: str = "all",
                 trainable_stages: int = 0, input_norm: str = "group", conv_norm: bool = False,
                 film_members: int = 0, film_gain: float = 1.0) -> nn.Module:
    """Build a registered model, or a timm NF model by its timm name (dpwa/models/nfnet.py);
    with film_members >= 2, as a FiLM-Ensemble of that many members (`film.film_ensemble`,
    diversity gain `film_gain`). `groups` / `weight_standardization` None: the model's own
    defaults (its paper's), which a config that leaves them out gets.

    Raises:
        ModelError: an unknown name (the known ones listed), a timm model with BatchNorm,
            pretrained weights or freezing asked of a model that does not take them.
    """
    nf = dict(pretrained=pretrained, trainable=trainable, trainable_stages=trainable_stages)
    takes = inspect.signature(MODELS[name]).parameters if name in MODELS else {}
    if input_norm != "group" and "input_norm" not in takes:
        raise ModelError(f"model.input_norm={input_norm} is for models with an input normalisation layer "
                         f"(scatter_cnn); {name!r} has none")
    if conv_norm and "conv_norm" not in takes:
        raise ModelError(f"model.conv_norm=true is for scatter_cnn (a GroupNorm after each conv); {name!r} "
                         "has its own normalisation layers")
    extra = {k: v for k, v in (("input_norm", input_norm), ("conv_norm", conv_norm)) if k in takes}
    shape = _shape_arguments(takes, groups=groups, weight_standardization=weight_standardization)
    if name in MODELS:
        fn = MODELS[name]
        if "pretrained" in inspect.signature(fn).parameters:
            model = fn(in_channels=in_channels, num_classes=num_classes, **shape, **nf)
        else:
            if pretrained is not None or trainable != "all":
                raise ModelError(f"model.pretrained / model.trainable are for NF models (timm's NF family, nf_micro*); "
                                 f"{name!r} is trained from scratch, all layers")
            model = _build(name, fn, in_channels=in_channels, num_classes=num_classes, **shape, **extra)
    else:
        from .nfnet import create_nf

        try:
            import timm

            known_to_timm = name in timm.list_models()
        except ImportError:  # pragma: no cover - timm is a dependency of the training side
            known_to_timm = False
        if not known_to_timm:
            raise ModelError(f"Unknown model {name!r}; known models: {sorted(MODELS)}, or a timm NF model "
                             "(dm_nfnet_f0, nfnet_l0, eca_nfnet_l0, nf_resnet26, nf_regnet_b0, ...)")
        _shape_arguments({}, groups=groups, weight_standardization=weight_standardization)  # warns if set
        model = create_nf(name, num_classes=num_classes, in_channels=in_channels, **nf)
    check_dp_compatible(model)
    if film_members >= 2:
        from .film import film_ensemble

        try:
            model = film_ensemble(model, film_members, film_gain)
        except ValueError as e:
            raise ModelError(f"model.film_members={film_members}: {e}") from None
    return model


#: what a model that takes groups / weight_standardization without defaults gets when a config
#: leaves them out: De et al.'s GroupNorm(16) and WS convs (every model's values before null meant
#: "the model's own")
_REQUIRED_SHAPE = {"groups": 16, "weight_standardization": True}


def _shape_arguments(takes: Mapping[str, inspect.Parameter], *, quiet: bool = False, **given: Any) -> dict[str, Any]:
    """The GroupNorm / WS arguments to pass: those the config sets; for one it leaves out
    (None), nothing, so the model keeps its own default, unless the model requires it (no
    default, or only **kwargs to take it in)."""
    any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in takes.values())
    out = {}
    for key, value in given.items():
        if value is not None and key not in takes and not any_keyword:  # an NF model: nothing to set
            if not quiet:
                warnings.warn(f"model.{key}={value} has no effect on this model, which takes no {key} (an NF model: "
                              "scaled weight-standardised convs, no GroupNorm); leave it out", stacklevel=3)
        elif value is not None:
            out[key] = value
        elif (key in takes and takes[key].default is inspect.Parameter.empty) or (key not in takes and any_keyword):
            out[key] = _REQUIRED_SHAPE[key]
    return out


def resolved_model_config(model_cfg: Any) -> Any:
    """`model_cfg` (a `ModelConfig`) with groups / weight_standardization left out (None) set to
    what the model gets (its own default; De et al.'s where it has none), for a registered
    model; a timm NF model takes neither and keeps None. A run folder's config.yaml says what
    was built, so a later change of a default cannot silently rebuild another architecture."""
    import dataclasses

    fn = MODELS.get(model_cfg.name)
    if fn is None:
        return model_cfg
    takes = inspect.signature(fn).parameters
    given = {"groups": model_cfg.groups, "weight_standardization": model_cfg.weight_standardization}
    passed = _shape_arguments(takes, quiet=True, **given)
    own = {k: takes[k].default for k in given if given[k] is None and k not in passed and k in takes}
    return dataclasses.replace(model_cfg, **{**passed, **own})


def _build(name: str, fn: Callable[..., nn.Module], **kw) -> nn.Module:
    """`fn(**kw)`, a GroupNorm that cannot split its channels named as the config's mistake."""
    try:
        return fn(**kw)
    except ValueError as e:
        if "divisible by num_groups" not in str(e):
            raise
        groups = f"model.groups={kw['groups']}" if "groups" in kw else f"{name!r}'s own number of GroupNorm groups"
        raise ModelError(f"{groups} does not divide the channels of a GroupNorm of {name!r} ({e}); set model.groups "
                         "to a divisor" + (", or leave it out for the model's own" if "groups" in kw else "")) from None


def check_dp_compatible(model: nn.Module) -> None:
    """Refuse layers that mix examples (BatchNorm, InstanceNorm with running stats)."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)):
            raise ModelError(
                f"Layer {name or type(module).__name__!r} is {type(module).__name__}: BatchNorm mixes the examples "
                "of a batch, so per-example gradients (and DP-SGD) are wrong with it. Use GroupNorm instead "
                "(e.g. nn.GroupNorm(16, channels); dpwa's models take model.groups)")
        if isinstance(module, nn.modules.instancenorm._InstanceNorm) and module.track_running_stats:
            raise ModelError(f"Layer {name!r} tracks running statistics across examples; use GroupNorm")


from . import cnn, nfnet, wrn  # noqa: E402,F401  (register the built-in models)
