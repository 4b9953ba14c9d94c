"""timm's normaliser-free networks made DP-ready (NF-ResNets: Brock et al. 2021a, "Characterizing
signal propagation to close the performance gap in unnormalized ResNets"; NFNets: Brock et
al. 2021b, "High-performance large-scale image recognition without normalization"), as De
et al. 2022 fine-tune them privately.

NF models have no BatchNorm (their convs are scaled weight-standardised, timm's
`ScaledStdConv2d`), so per-example gradients are well defined, but timm's code is written
for speed, not for per-example hooks. `make_dp_ready` rewrites, in place and without
changing the function the model computes:

* in-place activations (`ReLU(inplace=True)`, `GammaAct(inplace=True)`, ...) become out of
  place: they overwrite the output of the conv before them, which a per-example hook needs
  (the Opacus failure "Output 0 of BackwardHookFunction is a view and is being modified
  inplace" comes from these);
* the skip-init gain of `NormFreeBlock` (a bare scalar parameter applied with `out.mul_`)
  becomes a `ScalarGain` module, with its own per-example rule;
* ECA attention's `nn.Conv1d` becomes an equivalent `(1, k)` `Conv2d` (`Conv1dAs2d`).

`dp_check` lists every trainable parameter the dpwa-fast engine has no per-example rule
for, so a model is refused up front, never deep inside a backward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn as nn

from ..engines.fast import unsupported_parameters
from ..engines.rules import Layer, ScalarGainRule, register_rule
from . import ModelError, check_dp_compatible, register_model

__all__ = ["ScalarGain", "Conv1dAs2d", "make_dp_ready", "dp_check", "is_nf_model", "create_nf",
           "load_weights", "set_trainable", "TRAINABLE"]

TRAINABLE = ("all", "head", "stages")


class ScalarGain(nn.Module):
    """x * gain for a scalar parameter (NormFreeBlock's skip-init gain), out of place."""

    def __init__(self, gain: torch.Tensor) -> None:
        super().__init__()
        self.gain = nn.Parameter(gain.detach().clone().reshape(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


register_rule(ScalarGain, Layer(ScalarGainRule, params=("gain",)))  # here, so that the engines never import models


class Conv1dAs2d(nn.Module):
    """A Conv1d over (B, C, L) computed as a Conv2d with a (1, k) kernel: one dense-layer rule
    covers it. Its parameter keeps the Conv1d's name (`weight`, shape (O, I, 1, k))."""

    def __init__(self, conv: nn.Conv1d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(conv.in_channels, conv.out_channels, (1, conv.kernel_size[0]),
                              stride=(1, conv.stride[0]), padding=(0, conv.padding[0]),
                              dilation=(1, conv.dilation[0]), groups=conv.groups, bias=conv.bias is not None,
                              device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(conv.weight.unsqueeze(2))
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.unsqueeze(2)).squeeze(2)


def make_dp_ready(model: nn.Module) -> nn.Module:
    """Rewrite a timm NF model in place (see the module docstring); returns it."""
    from timm.models.nfnet import NormFreeBlock

    for module in list(model.modules()):
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        if isinstance(module, NormFreeBlock) and isinstance(module.skipinit_gain, nn.Parameter):
            gain = module.skipinit_gain
            del module.skipinit_gain        # unregister the bare parameter ...
            module.skipinit_gain = None     # ... so that forward skips its `out.mul_`
            module.drop_path = nn.Sequential(module.drop_path, ScalarGain(gain))  # same place in forward
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Conv1d):
                setattr(module, name, Conv1dAs2d(child))
    check_dp_compatible(model)
    return model


def _timm_to_dp_ready(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map a state dict in timm's own naming onto a `make_dp_ready` model's (renamed skip-init
    gains, Conv1d weights as (1, k) Conv2d weights); a dp-ready state dict passes through."""
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.endswith(".skipinit_gain"):
            key = key[: -len("skipinit_gain")] + "drop_path.1.gain"
            value = value.reshape(())
        elif key not in own and key.endswith(".weight") and key[: -len("weight")] + "conv.weight" in own:
            key = key[: -len("weight")] + "conv.weight"  # Conv1d -> Conv1dAs2d
            value = value.unsqueeze(2) if value.dim() == 3 else value
        elif key not in own and key.endswith(".bias") and key[: -len("bias")] + "conv.bias" in own:
            key = key[: -len("bias")] + "conv.bias"
        out[key] = value
    return out


def is_nf_model(name: str) -> bool:
    """Whether `name` is one of timm's NF models (NF-ResNet, NF-RegNet, NFNet, ECA-NFNet, ...)."""
    import timm

    if name not in timm.list_models():
        return False
    return timm.models.model_entrypoint(name).__module__ == "timm.models.nfnet"


def _classifier(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("classifier", "head.fc")


def load_weights(model: nn.Module, source: str, *, timm_name: Optional[str] = None) -> None:
    """Load pretrained weights into a dp-ready model, except its classifier head.

    `source` is a file (.safetensors; or a torch state dict .pt/.pth/.bin, read with
    `weights_only=True`: no pickled code runs; a dpwa checkpoint's "model" entry is used), or
    "cache": timm's Hugging Face cache for `timm_name`, offline (nothing is downloaded).

    Raises:
        ModelError: the file (or cache entry) is missing or unreadable, or its weights do
            not fit the model (keys listed). Never falls back to a random init.
    """
    if source == "cache":
        path = _cached_file(model, timm_name)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            what = ("is a folder, not a file" if path.is_dir() else
                    f"is a broken link (to {path.readlink()})" if path.is_symlink() else "no such file")
            raise ModelError(f"model.pretrained={source!r}: {what}. Give a .safetensors or torch state-dict "
                             "file, or model.pretrained=cache for timm's local cache (refusing a random init)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:
            raise ModelError(f"Cannot read pretrained weights {path}: not a valid .safetensors file "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # dpwa's own words: torch's advice (load it unsafely) is not passed on
            raise ModelError(f"Cannot read pretrained weights {path}: {_not_weights(e)}. dpwa reads torch files "
                             "as tensors only, so that no code inside a file runs. Give a state dict of tensors "
                             "(torch.save(model.state_dict(), 'weights.pt')), a .safetensors file, a dpwa "
                             "checkpoint.pt, or a run's weights.safetensors") from None
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]  # a dpwa checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    head = _classifier(model) + "."
    state = {k: v for k, v in _timm_to_dp_ready(state, model).items() if not k.startswith(head)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(head)}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    stem = next((k for k in own if own[k].dim() == 4), None)  # the first conv: its input channels
    if stem in wrong and own[stem].shape[1] != state[stem].shape[1]:
        raise ModelError(f"Pretrained weights {path} expect {state[stem].shape[1]}-channel images ({stem}: "
                         f"{tuple(state[stem].shape)}), but the data has {own[stem].shape[1]} channel(s) "
                         f"(the model's {tuple(own[stem].shape)}): give weights made for such images, or data "
                         "with as many channels as theirs")
    if missing or unexpected or wrong:
        raise ModelError(f"Pretrained weights {path} do not fit the model: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}, wrong shape {wrong[:5]}")
    model.load_state_dict(state, strict=False)


def _not_weights(error: Exception) -> str:
    """What a torch.load(weights_only=True) failure says about the file, in dpwa's words."""
    import pickle
    import re

    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(error))
        if found:
            return f"it holds the pickled Python object {found.group(1)}, which could run code when loaded"
        return "its contents are not tensors as torch.save writes them"
    return f"it is not a file written by torch.save ({type(error).__name__})"


def _cached_file(model: nn.Module, timm_name: Optional[str]) -> Path:
    from huggingface_hub import try_to_load_from_cache

    repo = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
    if not repo:
        raise ModelError(f"timm has no pretrained weights on record for {timm_name!r}; give model.pretrained=FILE")
    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, filename)
        if isinstance(found, str):
            return Path(found)
    raise ModelError(f"model.pretrained=cache: no {repo}/model.safetensors (or pytorch_model.bin) in the Hugging Face "
                     "cache (~/.cache/huggingface/hub, or $HF_HOME). dpwa never downloads weights: fetch them on a "
                     f"machine with a network (`timm.create_model({timm_name!r}, pretrained=True)`) or give "
                     "model.pretrained=FILE")


def set_trainable(model: nn.Module, which: str, stages: int = 0) -> list[str]:
    """Train all parameters, the head only (a private linear probe), or the head, the final
    conv and the last `stages` stages; freeze the rest (frozen parameters get no per-example
    gradients: their layers are not hooked and no graph is built through them). Returns the
    trainable parameter names."""
    if which not in TRAINABLE:
        raise ModelError(f"model.trainable must be one of {', '.join(TRAINABLE)}; got {which!r}")
    head = _classifier(model)
    n_stages = len(getattr(model, "stages", []))
    if which == "stages" and not 1 <= stages <= n_stages:
        raise ModelError(f"model.trainable_stages={stages} must be in [1, {n_stages}] (the model's stages)")
    keep = [head + ".", "final_conv."] + [f"stages.{i}." for i in range(n_stages - stages, n_stages)]
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(which == "all" or (which == "stages" and any(name.startswith(k) for k in keep))
                         or name.startswith(head + "."))
        if p.requires_grad:
            names.append(name)
    return names


def dp_check(model: nn.Module) -> list[str]:
    """Trainable parameters with no correct per-example gradient in the dpwa-fast engine:
    parameters of layers without a rule (`dpwa.engines.rules.problem`), tied weights."""
    return unsupported_parameters(model)


def create_nf(name: str, *, num_classes: int, in_channels: int = 3, pretrained: Optional[str] = None,
              trainable: str = "all", trainable_stages: int = 0, **timm_kwargs: Any) -> nn.Module:
    """A timm NF model by name, dp-ready, optionally with pretrained weights, its classifier
    re-initialised to zero for `num_classes` (De et al.), and the trainable part selected.

    Raises:
        ModelError: not a timm model, not an NF model (BatchNorm models are refused with a
            pointer to GroupNorm / NF models), missing weights, a parameter without a rule.
    """
    import timm

    require_nf(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **timm_kwargs)
    return _finish(model, name=name, pretrained=pretrained, trainable=trainable, trainable_stages=trainable_stages)


def require_nf(name: str) -> None:
    """Raise ModelError unless `name` is a timm NF model: unknown names and models with
    BatchNorm get different messages."""
    import timm

    if not is_nf_model(name):
        if name in timm.list_models():
            raise ModelError(f"timm model {name!r} is not a normaliser-free model; DP fine-tuning supports timm's NF "
                             "family (dm_nfnet_f0..f6, nfnet_*, eca_nfnet_*, nf_resnet*, nf_regnet_*, ...) whose "
                             "layers have no BatchNorm (BatchNorm mixes the examples of a batch; use GroupNorm)")
        raise ModelError(f"Unknown model {name!r}; timm's NF models include: "
                         f"{', '.join([n for n in timm.list_models('*nf*') if is_nf_model(n)][:12])}, ...")


def _finish(model: nn.Module, *, name: str, pretrained: Optional[str], trainable: str,
            trainable_stages: int) -> nn.Module:
    make_dp_ready(model)
    if pretrained:
        load_weights(model, pretrained, timm_name=name)
    head = model.get_submodule(_classifier(model))
    with torch.no_grad():  # zero-init classifier (De et al. 2022)
        for p in head.parameters():
            p.zero_()
    set_trainable(model, trainable, trainable_stages)
    bad = dp_check(model)
    if bad:
        raise ModelError(f"No per-example gradient rule for trainable parameter(s) {bad}; freeze them "
                         "(model.trainable) or use privacy.engine=torch-func")
    return model


def _tiny_cfg(**kw: Any):
    from timm.models.nfnet import NfCfg

    base = dict(depths=(1, 1, 1, 1), channels=(16, 32, 64, 128), stem_type="3x3", stem_chs=16, group_size=8,
                bottle_ratio=0.5, act_layer="relu", num_features=0)
    return NfCfg(**{**base, **kw})


# Small NF models from timm's own classes (NormFreeNet, NfCfg) for CPU-scale work and tests:
# nf_micro: NF-ResNet-like, 4 stages (16-128 channels); nf_micro_dm: dm-NFNet-like (skip-init
# gains, GELU with gamma, SAME padding, SE attention, extra conv); nf_micro_eca: ECA attention.
_TINY = {
    "nf_micro": dict(),
    "nf_micro_dm": dict(skipinit=True, act_layer="gelu", gamma_in_act=True, same_padding=True, attn_layer="se",
                        attn_kwargs=dict(rd_ratio=0.5), extra_conv=True, num_features=160),
    "nf_micro_eca": dict(attn_layer="eca", attn_kwargs={}, act_layer="silu", gamma_in_act=True),
}


def _register_tiny(name: str, kw: dict) -> None:
    @register_model(name)
    def build(*, in_channels: int, num_classes: int, pretrained: Optional[str] = None, trainable: str = "all",
              trainable_stages: int = 0) -> nn.Module:
        from timm.models.nfnet import NormFreeNet

        model = NormFreeNet(_tiny_cfg(**kw), num_classes=num_classes, in_chans=in_channels)
        return _finish(model, name=name, pretrained=pretrained, trainable=trainable,
                       trainable_stages=trainable_stages)


for _name, _kw in _TINY.items():
    _register_tiny(_name, _kw)
