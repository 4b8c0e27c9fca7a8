"""Contrastive losses over the global batch: softmax InfoNCE (CLIP) and sigmoid (SigLIP).

With torch.distributed initialised, each rank all-gathers both towers' features *with
gradient* and scores only its own rows against the global batch, so the logits per rank
are [local, global] and gradients reach every rank's features (OpenCLIP's `local_loss` with
`gather_with_grad`). Each rank's loss is the mean over its rows; the mean over ranks is the
single-process loss on the concatenated batch, and DDP's gradient averaging makes parameter
gradients equal the single-process ones.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(features: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's features along the batch; gradients flow back to each rank."""
    _, world_size = _world()
    if world_size == 1:
        return features
    # functional collectives: their all-gather has autograd (backward is a reduce-scatter of the
    # gradients); torch.distributed.nn's all_gather is deprecated. Older torch names it *_tensor_*.
    try:
        from torch.distributed._functional_collectives import all_gather_single_autograd as all_gather
    except ImportError:
        from torch.distributed._functional_collectives import all_gather_tensor_autograd as all_gather
    return all_gather(features.contiguous(), 0, dist.group.WORLD)


class ClipLoss(nn.Module):
    """Symmetric cross-entropy over image→text and text→image logits (Radford et al. 2021)."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must have the same shape (paired batches)")
        rank, _ = _world()
        all_image = gather_with_grad(image_features)
        all_text = gather_with_grad(text_features)
        local = image_features.shape[0]
        labels = torch.arange(local, device=image_features.device) + rank * local
        logits_per_image = logit_scale * image_features @ all_text.T  # shape = [local, global]
        logits_per_text = logit_scale * text_features @ all_image.T
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


class SigLipLoss(nn.Module):
    """Pairwise sigmoid loss with a learnable bias (Zhai et al. 2023): every pair is a binary label."""

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor,
                logit_scale: torch.Tensor, logit_bias: torch.Tensor) -> torch.Tensor:
        if image_features.shape != text_features.shape:
            raise ValueError(f"image features {tuple(image_features.shape)} and text features "
                             f"{tuple(text_features.shape)} must have the same shape (paired batches)")
        if logit_bias is None:
            raise ValueError("the sigmoid loss needs a logit_bias: build the model with init_logit_bias (e.g. -10)")
        rank, _ = _world()
        all_text = gather_with_grad(text_features)
        local = image_features.shape[0]
        logits = logit_scale * image_features @ all_text.T + logit_bias  # shape = [local, global]
        targets = -torch.ones_like(logits)
        targets[torch.arange(local), torch.arange(local) + rank * local] = 1.0
        return -F.logsigmoid(targets * logits).sum() / local


def create_loss(kind: str = "clip") -> nn.Module:
    kinds = {"clip": ClipLoss, "siglip": SigLipLoss}
    if kind not in kinds:
        raise ValueError(f"unknown loss {kind!r}; choose one of {sorted(kinds)}")
    return kinds[kind]()
