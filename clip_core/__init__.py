"""clip_core: CLIP (Radford et al. 2021) in PyTorch. Never imports ray or mlflow.

    model = clip_core.create_model("ViT-B-32")
    tokenize = clip_core.get_tokenizer()
    preprocess = clip_core.image_transform(model.config.vision.image_size, train=False)
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING

# Exported names come from their modules on first use: the torch-free parts (tokenizer, config, the
# Pillow transforms) load without torch, so Ray Data's preprocessing and decoding workers, which use
# only those, never import it (it costs each process ~260 MiB of private memory and seconds of start-up).
_EXPORTS = {
    "checkpoint": ("CheckpointError", "export_hf", "export_openclip", "load_model", "save_checkpoint"),
    "config": ("CLIPConfig", "TextConfig", "VisionConfig", "get_config", "list_models"),
    "loss": ("ClipLoss", "SigLipLoss", "create_loss"),
    "model": ("CLIP",),
    "tokenizer": ("Tokenizer", "get_tokenizer"),
    "transforms": ("ImageError", "image_transform", "open_image"),
    "zeroshot": ("DEFAULT_TEMPLATES", "IMAGENET_TEMPLATES", "SIMPLE_TEMPLATES", "linear_probe", "predict",
                 "retrieval_metrics", "zero_shot_classifier"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

if TYPE_CHECKING:
    import torch

    from .checkpoint import CheckpointError, export_hf, export_openclip, load_model, save_checkpoint
    from .config import CLIPConfig, TextConfig, VisionConfig, get_config, list_models
    from .loss import ClipLoss, SigLipLoss, create_loss
    from .model import CLIP
    from .tokenizer import Tokenizer, get_tokenizer
    from .transforms import ImageError, image_transform, open_image
    from .zeroshot import (
        DEFAULT_TEMPLATES,
        IMAGENET_TEMPLATES,
        SIMPLE_TEMPLATES,
        linear_probe,
        predict,
        retrieval_metrics,
        zero_shot_classifier,
    )


def __getattr__(name: str):
    if name in _MODULE_OF:
        value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    elif name in _EXPORTS:  # a submodule: clip_core.transforms, clip_core.zeroshot…
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *_EXPORTS})


_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def create_model(name: str | CLIPConfig, *, quick_gelu: bool | None = None, image_size: int | None = None,
                 init_logit_scale: float | None = None, init_logit_bias: float | None = None,
                 precision: str = "fp32", device: str | torch.device = "cpu") -> CLIP:
    """A randomly initialised CLIP from a preset name (`ViT-B/32`, `ViT-B-32-quickgelu`, `tiny`…) or a config;
    `init_logit_scale` is the log temperature it starts at (CLIP's log(1/0.07) unless given), and
    `init_logit_bias` gives it a learnable logit bias (SigLIP's sigmoid loss: log(10) and -10)."""
    import torch

    from .config import CLIPConfig, get_config
    from .model import CLIP

    config = name if isinstance(name, CLIPConfig) else get_config(name, quick_gelu=quick_gelu)
    if image_size is not None:
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    if init_logit_scale is not None:
        config = config.replace(init_logit_scale=init_logit_scale)
    if init_logit_bias is not None:
        config = config.replace(init_logit_bias=init_logit_bias)
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(_PRECISIONS)}")
    return CLIP(config).to(device=device, dtype=getattr(torch, _PRECISIONS[precision]))


__all__ = [
    "CLIP", "CLIPConfig", "CheckpointError", "ClipLoss", "DEFAULT_TEMPLATES", "IMAGENET_TEMPLATES", "ImageError",
    "SIMPLE_TEMPLATES", "SigLipLoss", "TextConfig", "Tokenizer", "VisionConfig", "create_loss", "create_model",
    "export_hf", "export_openclip", "get_config", "get_tokenizer", "image_transform", "linear_probe", "list_models",
    "load_model", "open_image", "predict", "retrieval_metrics", "save_checkpoint", "zero_shot_classifier",
]
