"""`dpwa finetune CONFIG [key=value ...]`: private fine-tuning of a pretrained NF model (timm's
NF family, dpwa/models/nfnet.py) on ImageNet-style data, as De et al. 2022 fine-tune NFNets.

The same run as `dpwa train` (run folder, progress, ledger reservation, averaging, --resume),
for an NF model: `model.pretrained` names the weights (a .safetensors / torch state-dict file,
or `cache` for timm's local cache; never downloaded, never silently random), the classifier
is re-initialised to zero for the data's classes, and `model.trainable` picks what is
trained (all | head | stages with model.trainable_stages). The run's last iterate is written
to RUN_DIR/weights.safetensors, which a later run can name as `model.pretrained`.
"""

from __future__ import annotations

import argparse

from . import train as _train

EXAMPLES = """examples (configs in configs/; README.md, "Private fine-tuning of NF models"):
  # CPU scale: pretrain nf_micro on CIFAR-10 classes 0-4 (declared public, no privacy), then
  # fine-tune it privately on classes 5-9 at epsilon 8, all layers or the head only
  dpwa train configs/cifar10_nfmicro_pretrain_public.yaml
  dpwa finetune configs/cifar10_nfmicro_finetune_cpu_eps8.yaml model.pretrained=runs/RUN_ID/weights.safetensors
  dpwa finetune configs/cifar10_nfmicro_finetune_cpu_eps8.yaml model.pretrained=runs/RUN_ID/weights.safetensors \\
      model.trainable=head
  # GPU scale: ImageNet-pretrained NFNets from a weights file or timm's local cache
  dpwa finetune configs/cifar10_nfnet_f0_finetune_eps1.yaml model.pretrained=cache
  dpwa finetune configs/imagenet_nfnet_f3_finetune_eps8.yaml data.root=/data/imagenet \\
      model.pretrained=~/weights/dm_nfnet_f3.safetensors
  dpwa finetune --resume RUN_DIR
"""


def check_config(cfg) -> None:
    from dpwa.config import ConfigError
    from dpwa.models import MODELS
    from dpwa.models.nfnet import require_nf

    name = cfg.model.name
    if name in MODELS:
        if not name.startswith("nf_micro"):
            raise ConfigError(f"dpwa finetune fine-tunes NF models (timm's NF family or nf_micro*); "
                              f"model.name={name!r} is not one: use dpwa train")
    else:
        require_nf(name)  # unknown, or a timm model with BatchNorm: refused with the reason


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = _train.add_parser(sub, "finetune", help="fine-tune a pretrained NF model with DP-SGD", description=__doc__,
                          epilog=EXAMPLES)
    p.set_defaults(check_config=check_config)
