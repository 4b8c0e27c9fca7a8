"""Our CLIP's weights in Hugging Face `transformers`' CLIPModel, for side-by-side benchmarks."""

from __future__ import annotations

import tempfile

import torch

from clip_core import CLIP, export_hf


def to_hf_clip(model: CLIP):
    """A transformers.CLIPModel with the same config and weights as `model` (ViT towers only)."""
    from transformers import CLIPModel

    with tempfile.TemporaryDirectory() as directory:
        return CLIPModel.from_pretrained(export_hf(model, directory)).eval()


@torch.no_grad()
def hf_encode_image(hf, images: torch.Tensor) -> torch.Tensor:
    return hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)


@torch.no_grad()
def hf_encode_text(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
