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
