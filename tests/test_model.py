import dataclasses
import math

import open_clip
import pytest
import torch

import clip_core
from clip_core.checkpoint import openclip_model_config
from clip_core.config import CLIPConfig, canonical_name, get_config
from workflows import synthetic

PUBLISHED = ["RN50", "RN101", "RN50x4", "RN50x16", "RN50x64", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"]


@pytest.mark.parametrize("name", PUBLISHED)
def test_presets_have_the_published_shapes(name):
    ours = openclip_model_config(get_config(name))
    theirs = open_clip.get_model_config(name)
    assert ours["embed_dim"] == theirs["embed_dim"]
    for section in ("vision_cfg", "text_cfg"):
        for key, value in theirs[section].items():
            if key in ours[section]:
                assert ours[section][key] == value, (section, key)
    # and every parameter tensor has OpenCLIP's name and shape (built without memory on the meta device)
    with torch.device("meta"):
        reference = open_clip.model.CLIP(**theirs)
        model = clip_core.CLIP(get_config(name))
    expected = {k: v.shape for k, v in reference.state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected


def test_cpu_presets_are_the_documented_sizes():
    tiny, small = get_config("tiny"), get_config("small")
    assert (tiny.vision.image_size, tiny.vision.patch_size, tiny.vision.width, tiny.vision.layers,
            tiny.vision.heads) == (64, 8, 256, 6, 4)
    assert (tiny.text.width, tiny.text.layers, tiny.text.heads, tiny.embed_dim) == (256, 6, 4, 256)
    assert (small.vision.image_size, small.vision.layers, small.vision.width, small.text.layers,
            small.text.width) == (128, 8, 384, 8, 384)


def test_names_accept_openai_and_openclip_spellings():
    assert canonical_name("ViT-B/32") == ("ViT-B-32", False)
    assert canonical_name("vit-b-32") == ("ViT-B-32", False)
    assert canonical_name("ViT-L/14@336px") == ("ViT-L-14-336", False)
    assert canonical_name("ViT-B-16-quickgelu") == ("ViT-B-16", True)
    assert get_config("RN50-quickgelu").quick_gelu and not get_config("RN50").quick_gelu
    assert get_config("RN50", quick_gelu=True).name == "RN50-quickgelu"


def test_unknown_model_name_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown model name 'ViT-Q-99'.*ViT-B-32"):
        clip_core.create_model("ViT-Q-99")


def test_invalid_configs_name_the_problem():
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        get_config("tiny").replace(vision=dataclasses.replace(get_config("tiny").vision, image_size=60))
    with pytest.raises(ValueError, match="unknown keys \\['depth'\\] in the 'text' section"):
        CLIPConfig.from_dict({"embed_dim": 8, "text": {"depth": 3}})
    with pytest.raises(ValueError, match="unknown precision"):
        clip_core.create_model("tiny", precision="fp8")
    tiny = get_config("tiny").to_dict()
    for section, key, value, message in (("vision", "image_size", 0, "vision.image_size must be a positive int"),
                                         ("vision", "mlp_ratio", 0, "vision.mlp_ratio must be a positive number"),
                                         ("vision", "head_width", 0, "vision.head_width must be a positive int"),
                                         (None, "quick_gelu", "false", "quick_gelu must be true or false")):
        changed = {**tiny, section: {**tiny[section], key: value}} if section else {**tiny, key: value}
        with pytest.raises(ValueError, match=f"invalid CLIP config: {message}, got {value!r}"):
            CLIPConfig.from_dict(changed)


def test_config_round_trips_through_a_dict():
    for name in ("RN50x4", "tiny"):
        config = get_config(name)
        assert CLIPConfig.from_dict(config.to_dict()) == config


def test_forward_returns_normalized_features_and_the_initial_temperature():
    model = clip_core.create_model("tiny").eval()
    images = torch.randn(3, 3, 64, 64)
    texts = clip_core.get_tokenizer()(["a red circle", "a blue square", "a star"])
    image_features, text_features, logit_scale = model(images, texts)
    assert image_features.shape == text_features.shape == (3, 256)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    assert logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    # encode_* default to unnormalized features, as OpenCLIP's do
    assert not torch.allclose(model.encode_image(images).norm(dim=-1), torch.ones(3))


def test_logit_scale_is_clamped_at_100_after_a_step_and_still_learns_there():
    model = clip_core.create_model("tiny")
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000))
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100))
    # at the cap the temperature still gets a gradient (it may come back down): the forward does not clamp
    images, texts = torch.randn(4, 3, 64, 64), clip_core.get_tokenizer()(["a", "b", "c", "d"])
    clip_core.ClipLoss()(*model(images, texts)).backward()
    assert model.logit_scale.grad is not None and model.logit_scale.grad.item() != 0.0


def test_text_tower_skips_positions_after_the_last_eot_without_changing_features():
    model = clip_core.create_model("tiny").eval()
    tokens = clip_core.get_tokenizer()(["a small red triangle", "hi"])
    with torch.no_grad():
        fast = model.encode_text(tokens)
        # reference: the whole context, as OpenAI computes it, with an explicit causal mask
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in model.transformer.resblocks:
            x = block(x, causal=True)
        x = model.ln_final(x)
        full = x[torch.arange(2), tokens.argmax(dim=-1)] @ model.text_projection
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_a_shorter_context_takes_prepared_rows_of_77_ids_cut_as_its_tokenizer_cuts():
    config = get_config("tiny")
    model = clip_core.create_model(config.replace(text=dataclasses.replace(config.text, context_length=12))).eval()
    texts = ["a photo of a small red triangle on a blue background with stripes", "hi"]
    with torch.no_grad():
        prepared = model.encode_text(clip_core.get_tokenizer()(texts))  # 77 ids a row, as the shards hold
        tokenized = model.encode_text(clip_core.get_tokenizer(12)(texts))
    torch.testing.assert_close(prepared, tokenized)


def test_patch_dropout_sees_only_the_kept_patches_in_any_order():
    torch.manual_seed(0)
    model = clip_core.create_model("tiny").eval()  # 64 px, patch 8: 64 patches
    images = torch.randn(2, 3, 64, 64)
    keep = model.sample_patches(2, 0.5, torch.Generator().manual_seed(1))
    assert keep.shape == (2, 32) and all(len(set(row.tolist())) == 32 for row in keep)
    assert torch.equal(keep, model.sample_patches(2, 0.5, torch.Generator().manual_seed(1)))
    with torch.no_grad():
        features = model.encode_image(images, patch_keep=keep)
        everything = model.encode_image(images)
        # every patch, shuffled: the same as no dropout (positions are embedded before the gather)
        shuffled = torch.stack([torch.randperm(64) for _ in range(2)])
        torch.testing.assert_close(model.encode_image(images, patch_keep=shuffled), everything, atol=1e-5, rtol=1e-4)
        assert (features - everything).abs().max() > 1e-3
        # a dropped patch's pixels change nothing; a kept one's do
        dropped = sorted(set(range(64)) - set(keep[0].tolist()))[0]
        changed = images.clone()
        changed[0, :, (dropped // 8) * 8:(dropped // 8 + 1) * 8, (dropped % 8) * 8:(dropped % 8 + 1) * 8] += 1
        torch.testing.assert_close(model.encode_image(changed, patch_keep=keep), features, atol=1e-6, rtol=0)
        kept = int(keep[0, 0])
        changed = images.clone()
        changed[0, :, (kept // 8) * 8:(kept // 8 + 1) * 8, (kept % 8) * 8:(kept % 8 + 1) * 8] += 1
        assert (model.encode_image(changed, patch_keep=keep)[0] - features[0]).abs().max() > 1e-4
    with torch.device("meta"), pytest.raises(ValueError, match="patch dropout needs a Vision Transformer; RN50"):
        clip_core.CLIP(get_config("RN50")).sample_patches(2, 0.5)


@pytest.mark.parametrize("name,image_size,checkpointing",
                         [("tiny", 64, False), ("tiny", 64, True), ("RN50", 64, False)])
def test_torch_compile_sees_the_model_as_one_graph(name, image_size, checkpointing):
    # a break (such as a length read from the data) splits what inductor fuses and recompiles per shape
    model = clip_core.create_model(name, image_size=image_size)
    model.set_grad_checkpointing(checkpointing)
    images, texts = torch.randn(2, 3, image_size, image_size), clip_core.get_tokenizer()(["a cat", "a dog"])
    explained = torch._dynamo.explain(model)(images, texts)
    torch._dynamo.reset()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.parametrize("name,image_size", [("tiny", 64), ("RN50", 64)])
def test_gradient_checkpointing_gives_the_same_gradients(name, image_size):
    model = clip_core.create_model(name, image_size=image_size)
    images, texts = torch.randn(2, 3, image_size, image_size), clip_core.get_tokenizer()(["a cat", "a dog"])
    loss_fn = clip_core.ClipLoss()

    def grads():
        model.zero_grad()
        loss_fn(*model(images, texts)).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-4)


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    model = clip_core.create_model("tiny").eval()
    images, texts = torch.randn(2, 3, 64, 64), clip_core.get_tokenizer()(["a cat", "a dog"])
    with torch.no_grad():
        reference = model.encode_image(images, normalize=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model.encode_image(images, normalize=True)
            text = model.encode_text(texts, normalize=True)
    assert low.dtype == torch.bfloat16 and text.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(low.float(), reference).min() > 0.99


def test_pure_bf16_weights_run():
    model = clip_core.create_model("tiny", precision="bf16").eval()
    with torch.no_grad():
        features = model.encode_image(torch.randn(1, 3, 64, 64))
    assert features.dtype == torch.bfloat16 and torch.isfinite(features.float()).all()


def test_tiny_preset_learns_synthetic_pairs():
    torch.manual_seed(0)
    model = clip_core.create_model("tiny")
    preprocess = clip_core.image_transform(64)
    batch = list(synthetic.samples(32, seed=3))
    images = torch.stack([preprocess(s.image) for s in batch])
    texts = clip_core.get_tokenizer()([s.caption for s in batch])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = clip_core.ClipLoss()
    losses = []
    for _ in range(15):
        loss = loss_fn(*model(images, texts))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > math.log(32) - 0.5
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("name", ["RN50", "tiny"])
def test_weight_decay_spares_gains_biases_and_temperature_as_openclip_does(name):
    model = clip_core.create_model(name, image_size=64)
    decay, no_decay = model.param_groups(0.2)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert len(decayed) + len(exempt) == len(names)
    # open_clip_train/main.py's `exclude`: no decay where the name holds bn, ln, bias or logit_scale, or p.ndim < 2
    openclip = {n for n, p in model.named_parameters()
                if p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n}
    assert exempt == openclip
    assert {"token_embedding.weight", "positional_embedding"} <= decayed  # the paper's "all weights that are not
    assert {"logit_scale", "ln_final.weight", "transformer.resblocks.0.mlp.c_fc.bias"} <= exempt  # gains or biases"


def test_locked_image_tower_keeps_its_weights_and_batchnorm_statistics():
    model = clip_core.create_model("RN50", image_size=64)
    with pytest.raises(ValueError, match="cannot leave 7 layer groups of the image tower unlocked: it has 6"):
        model.lock_image_tower(unlocked_layers=7)  # a stem, 4 stages, the attention pool
    model.lock_image_tower(unlocked_layers=1)  # the attention-pool head stays trainable
    assert not any(p.requires_grad for p in model.visual.layer4.parameters())
    assert all(p.requires_grad for p in model.visual.attnpool.parameters())
    assert all(p.requires_grad for p in model.transformer.parameters())
    model.train()
    assert not model.visual.bn1.training and model.transformer.training
    before = model.visual.bn1.running_mean.clone()
    model.encode_image(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.visual.bn1.running_mean, before)
    vit = clip_core.create_model("tiny")
    vit.lock_text_tower()
    assert not any(p.requires_grad for n, p in vit.named_parameters() if not n.startswith(("visual.", "logit_")))
    assert all(p.requires_grad for p in vit.visual.parameters())


def test_the_notebook_interface_runs_as_design_writes_it(tmp_path):
    model = clip_core.create_model("tiny")
    tokenize = clip_core.get_tokenizer()
    preprocess = clip_core.image_transform(model.config.image_size, train=False)
    images = torch.stack([preprocess(sample.image) for sample in synthetic.samples(2, image_size=80)])
    assert images.shape == (2, 3, 64, 64)
    with torch.no_grad():
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokenize(["a red circle", "a blue square"]), normalize=True)
    assert image_features.norm(dim=-1) == pytest.approx([1, 1]) and text_features.shape == (2, 256)
    clip_core.save_checkpoint(model, tmp_path / "ckpt")
    loaded = clip_core.load_model(tmp_path / "ckpt")
    assert clip_core.zero_shot_classifier(loaded, tokenize, ["circle", "square"], ["a {}"]).shape == (256, 2)
