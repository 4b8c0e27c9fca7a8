"""A micro CLIP (64 wide, 2 layers, 64 px) for tests of the stages: their machinery without the compute."""

from __future__ import annotations

import dataclasses

import torch

import clip_core
from workflows.synthetic import samples


def micro_config() -> clip_core.CLIPConfig:
    tiny = clip_core.get_config("tiny")
    return tiny.replace(name="micro", embed_dim=64, vision=dataclasses.replace(tiny.vision, width=64, layers=2),
                        text=dataclasses.replace(tiny.text, width=64, heads=1, layers=2))


def briefly_trained(steps: int = 20) -> clip_core.CLIP:
    """A few contrastive steps on synthetic pairs: features apart (near-identical
    synthetic images still score within ~1e-6 of each other)."""
    torch.manual_seed(0)
    model = clip_core.CLIP(micro_config())
    pairs = list(samples(128, split="all", seed=3, image_size=64))
    transform, tokenize = clip_core.image_transform(64), clip_core.get_tokenizer()
    images, tokens = torch.stack([transform(s.image) for s in pairs]), tokenize([s.caption for s in pairs])
    optimizer, loss_fn = torch.optim.AdamW(model.parameters(), lr=2e-3), clip_core.ClipLoss()
    for step in range(steps):
        batch = slice(step % 4 * 32, step % 4 * 32 + 32)
        optimizer.zero_grad()
        loss_fn(*model(images[batch], tokens[batch])).backward()
        optimizer.step()
    return model.eval()


def hf_clip(hidden_act: str = "quick_gelu", **vision):
    """A small random Hugging Face transformers CLIPModel (64 px), made and initialised by transformers."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(hidden_size=64, intermediate_size=256, num_attention_heads=2, num_hidden_layers=2,
                         hidden_act=hidden_act),
        vision_config=dict(hidden_size=96, intermediate_size=384, num_attention_heads=3, num_hidden_layers=2,
                           image_size=64, patch_size=16, hidden_act=hidden_act, **vision),
        projection_dim=32)
    return CLIPModel(config).eval()
