"""Our CLIP and OpenCLIP's, with the same random weights, compute the same thing (fp32, 1e-5), and our
training step updates them as OpenCLIP's training script does."""

import open_clip
import pytest
import torch

import clip_core
from clip_core.checkpoint import read_torchscript_state_dict

ATOL = 1e-5


def _inputs(image_size: int):
    images = torch.randn(3, 3, image_size, image_size)
    texts = clip_core.get_tokenizer()(["a diagram", "a photo of a dog on a red sofa, taken at night", ""])
    return images, texts


def _assert_same_outputs(ours, theirs, image_size=224):
    ours.eval(), theirs.eval()
    images, texts = _inputs(image_size)
    with torch.no_grad():
        a_img, a_txt, a_scale = ours(images, texts)
        b_img, b_txt, b_scale = theirs(images, texts)
        torch.testing.assert_close(ours.encode_image(images), theirs.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(ours.encode_text(texts), theirs.encode_text(texts), atol=ATOL, rtol=0)
    torch.testing.assert_close(a_img, b_img, atol=ATOL, rtol=0)
    torch.testing.assert_close(a_txt, b_txt, atol=ATOL, rtol=0)
    torch.testing.assert_close(a_scale * a_img @ a_txt.T, b_scale * b_img @ b_txt.T, atol=ATOL * 100, rtol=1e-5)


@pytest.fixture(scope="module", params=["ViT-B-32", "RN50"])
def openclip_model(request):
    torch.manual_seed(1)
    return request.param, open_clip.create_model(request.param, pretrained=None).eval()


def test_openclip_weights_load_into_ours(openclip_model):
    name, theirs = openclip_model
    ours = clip_core.create_model(name)
    ours.load_state_dict(theirs.state_dict())
    _assert_same_outputs(ours, theirs)


def test_our_weights_load_into_openclip(openclip_model):
    name, _ = openclip_model
    ours = clip_core.create_model(name)
    theirs = open_clip.create_model(name, pretrained=None)
    theirs.load_state_dict(ours.state_dict())
    _assert_same_outputs(ours, theirs)


def test_fresh_weights_are_drawn_as_openclip_draws_them(openclip_model):
    """Training from scratch starts where OpenCLIP (and OpenAI) start: each tensor's mean and spread
    match (the image tower's blocks keep nn.MultiheadAttention's and nn.Linear's defaults, the text
    tower's follow OpenAI's depth-scaled scheme, attention biases start at zero)."""
    name, theirs = openclip_model
    torch.manual_seed(1)
    ours = clip_core.create_model(name).state_dict()
    mismatched = []
    for key, b in theirs.state_dict().items():
        a, b = ours[key].double(), b.double()
        if b.numel() < 64:
            if not torch.equal(a, b):
                mismatched.append(key)
            continue
        std = b.std().item()
        if (abs(a.std().item() - std) > 0.1 * std + 1e-6
                or abs(a.mean() - b.mean()).item() > 5 * std / b.numel() ** 0.5 + 1e-6):
            mismatched.append(f"{key}: mean {a.mean():.4f} std {a.std():.4f}, "
                              f"OpenCLIP mean {b.mean():.4f} std {std:.4f}")
    assert not mismatched, "\n".join(mismatched)


def test_openclip_training_checkpoint_loads_with_its_activation(tmp_path):
    torch.manual_seed(2)
    theirs = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None)
    path = tmp_path / "epoch_3.pt"
    state_dict = {f"module.{k}": v for k, v in theirs.state_dict().items()}  # as saved from DDP
    # its name is the run's: open_clip_train's default, <date>-model_<model>-lr_<lr>-b_<batch>-j_<workers>-p_<precision>
    run = "2025_01_02-03_04_05-model_ViT-B-32-quickgelu-lr_0.0005-b_256-j_8-p_amp"
    torch.save({"epoch": 3, "name": run, "state_dict": state_dict, "optimizer": {}}, path)
    ours = clip_core.load_model(path)
    assert ours.config.quick_gelu and ours.config.name == "ViT-B-32-quickgelu"
    _assert_same_outputs(ours, theirs)
    # a --name of the user's own says nothing of the activation: assumed GELU, with a warning saying how to choose
    torch.save({"epoch": 3, "name": "my-lit-run", "state_dict": state_dict, "optimizer": {}}, path)
    with pytest.warns(UserWarning, match="does not say whether it was trained with QuickGELU"):
        assert not clip_core.load_model(path).config.quick_gelu


def test_openai_torchscript_archive_loads_without_running_its_code(tmp_path):
    torch.manual_seed(3)
    reference = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()
    images, texts = _inputs(224)
    archive = tmp_path / "RN50.pt"
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(reference, (images, texts), check_trace=False), archive)
    tensors = read_torchscript_state_dict(archive)
    assert set(reference.state_dict()) <= set(tensors)
    ours = clip_core.load_model(archive)
    assert ours.config.quick_gelu, "OpenAI's weights need QuickGELU"
    assert ours.config.name == "RN50-quickgelu"
    _assert_same_outputs(ours, reference)


def test_openai_plain_state_dict_loads(tmp_path):
    torch.manual_seed(4)
    reference = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    state_dict = {k: v.half() for k, v in reference.state_dict().items()}  # OpenAI ships fp16 weights
    state_dict.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                      vocab_size=torch.tensor(49408))
    torch.save(state_dict, tmp_path / "ViT-B-32.pt")
    ours = clip_core.load_model(tmp_path / "ViT-B-32.pt")
    assert ours.config.quick_gelu and ours.config.name == "ViT-B-32-quickgelu"
    reference.load_state_dict({k: v.float() for k, v in state_dict.items() if k in reference.state_dict()})
    _assert_same_outputs(ours, reference)


def test_our_checkpoint_directory_loads_in_openclip(tmp_path):
    ours = clip_core.create_model("tiny")
    clip_core.save_checkpoint(ours, tmp_path / "ckpt")
    theirs = open_clip.create_model(f"local-dir:{tmp_path / 'ckpt'}")
    _assert_same_outputs(ours, theirs, image_size=64)


def test_exported_openclip_checkpoint_loads_in_openclip(tmp_path):
    ours = clip_core.create_model("ViT-B-16-quickgelu", image_size=64)
    path = clip_core.export_openclip(ours, tmp_path / "exported.pt")
    theirs = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, force_image_size=64)
    open_clip.load_checkpoint(theirs, str(path))
    _assert_same_outputs(ours, theirs, image_size=64)



def test_loading_at_another_resolution_resizes_position_embeddings_as_openclip_does(tmp_path):
    torch.manual_seed(2)
    clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path / "ckpt")  # a 64 px ViT, grid 8
    for size in (96, 48):  # up and down
        ours = clip_core.load_model(tmp_path / "ckpt", image_size=size)
        theirs = open_clip.create_model(f"local-dir:{tmp_path / 'ckpt'}", force_image_size=size)
        _assert_same_outputs(ours, theirs, image_size=size)


@pytest.mark.parametrize("section, setting", [("text_cfg", {"pool_type": "eos", "eos_id": 2}),
                                              ("text_cfg", {"no_causal_mask": True}),
                                              ("vision_cfg", {"pool_type": "avg"}),
                                              ("vision_cfg", {"norm_kwargs": {"eps": 1e-6}}),
                                              ("text_cfg", {"hf_tokenizer_name": "facebook/xlm-v-base"})])
def test_an_openclip_model_that_computes_otherwise_with_the_same_shapes_is_refused(tmp_path, section, setting):
    import json

    clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path)
    path = tmp_path / "open_clip_config.json"
    description = json.loads(path.read_text())
    description["model_cfg"][section].update(setting)
    path.write_text(json.dumps(description))
    (tmp_path / "config.json").unlink()  # now an OpenCLIP local dir only
    open_clip.create_model(f"local-dir:{tmp_path}")  # OpenCLIP builds it from these very weights
    key = next(iter(setting))
    with pytest.raises(clip_core.CheckpointError, match=rf"clip_core does not build: {section}\.{key}="):
        clip_core.load_model(tmp_path)


@pytest.mark.parametrize("setting", [{"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},  # laion's ViT-L-14
                                     {"resize_mode": "squash"},  # DFN's ViT-H-14
                                     {"interpolation": "bilinear"}])
def test_openclip_weights_trained_on_other_inputs_are_refused(tmp_path, setting):
    import json

    clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path)
    (tmp_path / "config.json").unlink()  # an OpenCLIP local dir only
    clip_core.load_model(tmp_path)  # as exported: OpenAI's preprocessing, as clip_core's transforms do
    path = tmp_path / "open_clip_config.json"
    description = json.loads(path.read_text())
    description["preprocess_cfg"].update(setting)
    path.write_text(json.dumps(description))
    key = next(iter(setting))
    assert open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")[0].visual.preprocess_cfg[key] \
        == setting[key], "OpenCLIP preprocesses these weights' inputs so"
    with pytest.raises(clip_core.CheckpointError, match=rf"open_clip_config.json preprocesses with {key} "
                                                        rf".*clip_core's transforms use"):
        clip_core.load_model(tmp_path)


def test_a_state_dict_with_another_tokenizers_vocabulary_is_refused():
    state_dict = clip_core.create_model("tiny").state_dict()
    state_dict["token_embedding.weight"] = torch.zeros(901_629, state_dict["token_embedding.weight"].shape[1])
    with pytest.raises(ValueError, match="text.vocab_size is 901629, but clip_core tokenizes with CLIP's BPE"):
        clip_core.checkpoint.config_from_state_dict(state_dict)


def _openclip_decays(name: str, param: torch.Tensor) -> bool:
    """open_clip_train.main's rule, which it writes inline: decay all but gains, biases and the temperature."""
    return not (param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)


def _same_start(directory):
    """A micro CLIP of ours and OpenCLIP's with the same random weights, the latter as open_clip_train makes it."""
    from micro import micro_config

    torch.manual_seed(0)
    ours = clip_core.CLIP(micro_config())
    clip_core.save_checkpoint(ours, directory)
    return ours, open_clip.create_model(f"local-dir:{directory}", output_dict=True)


def _batches(steps: int, batch: int):
    generator = torch.Generator().manual_seed(5)
    words = ["red", "blue", "square", "circle", "large", "small", "striped", "dotted"]
    tokenize = clip_core.get_tokenizer()
    return [(torch.randn(batch, 3, 64, 64, generator=generator),
             tokenize([" ".join(words[j] for j in torch.randint(8, (4,), generator=generator)) for _ in range(batch)]))
            for _ in range(steps)]


def _openclip_train(model, batches, accum_freq: int, optimizer, scheduler, grad_clip_norm: float | None) -> None:
    """OpenCLIP's own `train_one_epoch` over `batches` (one optimizer step each), in accum_freq micro-batches."""
    from types import SimpleNamespace

    from open_clip_train.data import DataInfo
    from open_clip_train.train import train_one_epoch

    loader = type("Loader", (list,), {})([(images[rows], tokens[rows]) for images, tokens in batches
                                          for rows in torch.arange(len(images)).chunk(accum_freq)])
    loader.num_batches, loader.num_samples = len(loader), sum(len(images) for images, _ in batches)
    args = SimpleNamespace(device="cpu", precision="fp32", accum_freq=accum_freq, distill=False,
                           skip_scheduler=scheduler is None, grad_clip_norm=grad_clip_norm, horovod=False,
                           log_every_n_steps=len(batches), batch_size=len(batches[0][0]) // accum_freq,
                           world_size=1, rank=0, local_rank=0, wandb=False)
    train_one_epoch(model, {"train": DataInfo(loader)}, open_clip.ClipLoss(), 0, optimizer, None, scheduler, None,
                    args)


def test_training_steps_match_openclips_train_one_epoch(tmp_path):
    """Our update (clip_core's loss, the train stage's optimizer, schedule and clipping) and
    OpenCLIP's own `train_one_epoch` take the same weights through the same batches to the same
    place. The weight-decay grouping is OpenCLIP's (checked here), and the reference optimizer is
    given ours to compare everything else."""
    from open_clip_train.scheduler import cosine_lr

    from workflows.train import TrainConfig, build_optimizer, optimizer_step

    config = TrainConfig(data=["unused"], steps=5, batch_size=16, lr=2e-3, warmup_steps=2, weight_decay=0.2,
                         grad_clip_norm=0.5)
    ours, theirs = _same_start(tmp_path / "start")
    batches = _batches(config.steps, config.batch_size)

    optimizer, scheduler, scaler = build_optimizer(ours, config, torch.device("cpu"))
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    our_decays = {name for name, param in ours.named_parameters() if id(param) in decayed}
    their_decays = {name for name, param in theirs.named_parameters() if _openclip_decays(name, param)}
    assert our_decays == their_decays

    for images, tokens in batches:
        optimizer_step(ours, ours, optimizer, scheduler, scaler, clip_core.ClipLoss(), images, tokens, config,
                       torch.autocast("cpu", enabled=False))

    named = dict(theirs.named_parameters())
    reference = torch.optim.AdamW([{"params": [p for n, p in named.items() if n in our_decays], "weight_decay": 0.2},
                                   {"params": [p for n, p in named.items() if n not in our_decays],
                                    "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    _openclip_train(theirs, batches, 1, reference, cosine_lr(reference, config.lr, config.warmup_steps, config.steps),
                    config.grad_clip_norm)

    mismatched = []
    for name, value in theirs.state_dict().items():
        difference = (ours.state_dict()[name] - value).abs().max().item()
        if difference > 2e-5:  # 3e-6 seen (rounding through Adam); a 10% different weight decay moves 7e-5
            mismatched.append(f"{name} differs by {difference:.2e}")
    assert not mismatched, "\n".join(mismatched)


@pytest.mark.parametrize("accum_freq", [2, 4])
def test_accumulation_matches_openclips_but_for_its_temperature_gradient(tmp_path, accum_freq):
    """OpenCLIP's accum_freq keeps the contrastive batch whole as ours does, and each feature's
    gradient is the big batch's in both. But OpenCLIP keeps the temperature live in every
    micro-batch's backward, so its gradient is accum_freq times the big batch's (which tilts the
    clipping norm too); ours counts it once (test_train checks ours against the big batch)."""
    from workflows.train import contrastive_step

    ours, theirs = _same_start(tmp_path / "start")
    batches = _batches(1, 16)
    _openclip_train(theirs, batches, accum_freq, torch.optim.SGD(theirs.parameters(), lr=0.0), None, None)
    contrastive_step(ours, clip_core.ClipLoss(), *batches[0], accum_freq, torch.autocast("cpu", enabled=False))

    their_grads = {name: param.grad for name, param in theirs.named_parameters()}
    for name, param in ours.named_parameters():
        expected = their_grads[name] / accum_freq if name == "logit_scale" else their_grads[name]
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-4, msg=name)
    assert ours.logit_scale.grad.abs() > 1e-2  # so the factor is seen


@pytest.mark.parametrize("name", ["ViT-B-16", "ViT-H-14", "ViT-g-14", "ViT-bigG-14"])
def test_a_bare_openclip_state_dict_gets_its_heads_right(name):
    """A bare state dict does not say how many heads it has, and the wrong count fits every shape:
    ViT-H's 80-wide heads read as 64-wide would give 20 heads instead of 16, and wrong features.
    (The model is built on the meta device: shapes, no memory.)"""
    from open_clip.model import CLIP

    from clip_core.checkpoint import config_from_state_dict

    settings = open_clip.get_model_config(name)
    with torch.device("meta"):
        state_dict = CLIP(**settings).state_dict()
    config = config_from_state_dict(state_dict, source=name)
    vision, text = settings["vision_cfg"], settings["text_cfg"]
    assert config.vision.head_width == vision.get("head_width", 64)
    assert (config.vision.width, config.vision.layers) == (vision["width"], vision["layers"])
    assert config.text.heads == text.get("heads", 8)


@pytest.mark.parametrize("unlocked", [0, 1, 2, 12, 14])
def test_locking_a_tower_leaves_trainable_what_openclips_lock_does(unlocked):
    """LiT: --lock-image-unlocked-groups N and --lock-text-unlocked-layers N leave the same parameters trainable
    as OpenCLIP's lock_image_tower / lock_text_tower (ViT-B-32: 12 blocks, so 14 groups a tower)."""
    ours, theirs = clip_core.create_model("ViT-B-32"), open_clip.create_model("ViT-B-32", pretrained=None)
    ours.lock_image_tower(unlocked)
    ours.lock_text_tower(unlocked)
    theirs.lock_image_tower(unlocked)
    theirs.lock_text_tower(unlocked)

    def trainable(model):
        return {name for name, param in model.named_parameters() if param.requires_grad}

    assert trainable(ours) == trainable(theirs)
    assert ("visual.proj" in trainable(ours)) == (unlocked > 0)


@pytest.mark.parametrize("scheduler", ["cosine", "const", "const-cooldown"])
def test_learning_rate_schedules_are_openclips(scheduler):
    """--lr-scheduler cosine, const and const-cooldown give the rate open_clip_train's schedulers set, step by
    step (OpenCLIP's cooldown counts epochs; here steps)."""
    from open_clip_train.scheduler import const_lr, const_lr_cooldown, cosine_lr

    from workflows.train import TrainConfig, lr_schedule

    cooldown = {"cooldown_steps": 40, "lr_cooldown_power": 2.0, "lr_cooldown_end": 1e-5} \
        if scheduler == "const-cooldown" else {}
    config = TrainConfig(data=["d"], steps=100, warmup_steps=10, lr=1e-3, lr_scheduler=scheduler, **cooldown)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.lr)
    theirs = {"cosine": lambda: cosine_lr(optimizer, config.lr, 10, 100),
              "const": lambda: const_lr(optimizer, config.lr, 10, 100),
              "const-cooldown": lambda: const_lr_cooldown(optimizer, config.lr, 10, 100, 40, 2.0, 1e-5)}[scheduler]()
    factor = lr_schedule(config)
    assert [config.lr * factor(step) for step in range(100)] == pytest.approx([theirs(step) for step in range(100)],
                                                                             rel=1e-9, abs=1e-15)
    if scheduler == "const-cooldown":  # a cooldown without its length, or one that cannot fit, fails at once
        with pytest.raises(ValueError, match="cooldown_steps goes with lr_scheduler const-cooldown"):
            TrainConfig(data=["d"], steps=100, lr_scheduler="const-cooldown")
        with pytest.raises(ValueError, match=r"warmup_steps \(10\) and cooldown_steps \(95\) are more than steps"):
            TrainConfig(data=["d"], steps=100, warmup_steps=10, lr_scheduler="const-cooldown", cooldown_steps=95)
