"""Our CLIP and OpenCLIP's, with the same random weights, compute the same thing (fp32, 1e-5)."""

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
    torch.save({"epoch": 3, "name": "ViT-B-32-quickgelu", "state_dict": state_dict, "optimizer": {}}, path)
    ours = clip_core.load_model(path)
    assert ours.config.quick_gelu and ours.config.name == "ViT-B-32-quickgelu"
    _assert_same_outputs(ours, theirs)


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
