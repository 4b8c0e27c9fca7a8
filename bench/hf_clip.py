"""Our CLIP's weights in Hugging Face `transformers`' CLIPModel, for side-by-side benchmarks."""

from __future__ import annotations

import torch

from clip_core import CLIP
from clip_core.checkpoint import hf_state_dict


def to_hf_clip(model: CLIP):
    """A transformers.CLIPModel with the same config and weights as `model` (ViT towers only)."""
    from transformers import CLIPConfig, CLIPModel

    config, v, t = model.config, model.config.vision, model.config.text
    if v.is_resnet:
        raise ValueError("transformers' CLIPModel has no ModifiedResNet tower")
    act = "quick_gelu" if config.quick_gelu else "gelu"
    hf_config = CLIPConfig(
        text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width, intermediate_size=int(t.width * t.mlp_ratio),
                         num_attention_heads=t.heads, num_hidden_layers=t.layers,
                         max_position_embeddings=t.context_length,
                         hidden_act=act, eos_token_id=49407, layer_norm_eps=1e-5),
        vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                           num_attention_heads=v.heads,
                           num_hidden_layers=v.layers, image_size=v.image_size, patch_size=v.patch_size, hidden_act=act,
                           layer_norm_eps=1e-5),
        projection_dim=config.embed_dim,
    )
    hf = CLIPModel(hf_config)
    out = hf_state_dict(model.state_dict())
    missing, unexpected = hf.load_state_dict(out, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"conversion left missing={missing} unexpected={unexpected}")
    return hf.eval()


@torch.no_grad()
def hf_encode_image(hf, images: torch.Tensor) -> torch.Tensor:
    return hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)


@torch.no_grad()
def hf_encode_text(hf, tokens: torch.Tensor) -> torch.Tensor:
    return hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
