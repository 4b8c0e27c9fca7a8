"""clip_core: CLIP (Radford et al. 2021) in PyTorch. Never imports ray or mlflow.

    model = clip_core.create_model("ViT-B-32")
    tokenize = clip_core.get_tokenizer()
    preprocess = clip_core.image_transform(model.config.vision.image_size, train=False)
"""

from __future__ import annotations

import dataclasses

import torch

from .checkpoint import CheckpointError, export_openclip, load_model, save_checkpoint
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

_PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def create_model(name: str | CLIPConfig, *, quick_gelu: bool | None = None, image_size: int | None = None,
                 init_logit_bias: float | None = None, precision: str = "fp32",
                 device: str | torch.device = "cpu") -> CLIP:
    """A randomly initialised CLIP from a preset name (`ViT-B/32`, `ViT-B-32-quickgelu`, `tiny`…) or a config."""
    config = name if isinstance(name, CLIPConfig) else get_config(name, quick_gelu=quick_gelu)
    if image_size is not None:
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
    if init_logit_bias is not None:
        config = config.replace(init_logit_bias=init_logit_bias)
    if precision not in _PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {sorted(_PRECISIONS)}")
    return CLIP(config).to(device=device, dtype=_PRECISIONS[precision])


__all__ = [
    "CLIP", "CLIPConfig", "CheckpointError", "ClipLoss", "DEFAULT_TEMPLATES", "IMAGENET_TEMPLATES", "ImageError",
    "SIMPLE_TEMPLATES", "SigLipLoss", "TextConfig", "Tokenizer", "VisionConfig", "create_loss", "create_model",
    "export_openclip", "get_config", "get_tokenizer", "image_transform", "linear_probe", "list_models",
    "load_model", "open_image", "predict", "retrieval_metrics", "save_checkpoint", "zero_shot_classifier",
]
