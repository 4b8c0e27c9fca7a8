"""Our CLIP's weights in Hugging Face `transformers`' CLIPModel, for side-by-side benchmarks."""

from __future__ import annotations

import torch

from clip_core import CLIP


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
    sd = model.state_dict()
    out = {"logit_scale": sd["logit_scale"],
           "text_model.embeddings.token_embedding.weight": sd["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": sd["positional_embedding"],
           "text_model.final_layer_norm.weight": sd["ln_final.weight"],
           "text_model.final_layer_norm.bias": sd["ln_final.bias"],
           "text_projection.weight": sd["text_projection"].T,
           "vision_model.embeddings.class_embedding": sd["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": sd["visual.positional_embedding"],
           "vision_model.pre_layrnorm.weight": sd["visual.ln_pre.weight"],
           "vision_model.pre_layrnorm.bias": sd["visual.ln_pre.bias"],
           "vision_model.post_layernorm.weight": sd["visual.ln_post.weight"],
           "vision_model.post_layernorm.bias": sd["visual.ln_post.bias"],
           "visual_projection.weight": sd["visual.proj"].T}
    for ours, theirs, layers in (("transformer", "text_model", t.layers),
                                 ("visual.transformer", "vision_model", v.layers)):
        for i in range(layers):
            src, dst = f"{ours}.resblocks.{i}.", f"{theirs}.encoder.layers.{i}."
            for part, w in zip("qkv", sd[src + "attn.in_proj_weight"].chunk(3)):
                out[f"{dst}self_attn.{part}_proj.weight"] = w
            for part, b in zip("qkv", sd[src + "attn.in_proj_bias"].chunk(3)):
                out[f"{dst}self_attn.{part}_proj.bias"] = b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{dst}{b}.weight"] = sd[f"{src}{a}.weight"]
                out[f"{dst}{b}.bias"] = sd[f"{src}{a}.bias"]
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
