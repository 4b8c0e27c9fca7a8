import collections
import dataclasses
import io
import json
import os
import pickle
import sys
import types
import zipfile

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import clip_core
from clip_core import CheckpointError
from micro import hf_clip, micro_config


def test_checkpoint_round_trips_bit_exactly(tmp_path):
    model = clip_core.create_model("tiny", init_logit_bias=-10.0)
    directory = clip_core.save_checkpoint(model, tmp_path / "ckpt")
    assert sorted(os.listdir(directory)) == ["config.json", "model.safetensors", "open_clip_config.json"]
    loaded = clip_core.load_model(directory)
    assert loaded.config == model.config
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    description = json.loads((directory / "config.json").read_text())
    assert description["tokenizer"] == {"id": "clip-bpe-49408", "context_length": 77}
    assert description["preprocess"]["size"] == 64 and description["model"]["name"] == "tiny"


def test_weights_use_openai_key_names(tmp_path):
    clip_core.save_checkpoint(clip_core.create_model("RN50", image_size=64), tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    for key in ("visual.attnpool.c_proj.weight", "visual.layer1.0.downsample.0.weight", "ln_final.weight",
                "text_projection", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight"):
        assert key in keys


def test_bare_safetensors_file_infers_the_architecture(tmp_path):
    model = clip_core.create_model("ViT-B-16", image_size=64)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    with pytest.warns(UserWarning, match="assuming GELU"):
        loaded = clip_core.load_model(tmp_path / "weights.safetensors")
    assert loaded.config.vision == model.config.vision and loaded.config.text == model.config.text
    assert not loaded.config.quick_gelu
    assert clip_core.load_model(tmp_path / "weights.safetensors", quick_gelu=True).config.quick_gelu


def test_a_bare_state_dict_of_any_mlp_width_loads(tmp_path):
    # width 88 with a 120-wide MLP: 120 / 88 * 88 is 119.99…, which int() made a 119-wide layer
    config = micro_config()
    config = config.replace(text=dataclasses.replace(config.text, width=88, heads=1, mlp_ratio=120 / 88 + 1e-9))
    model = clip_core.CLIP(config)
    assert model.transformer.resblocks[0].mlp.c_fc.out_features == 120
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "weights.safetensors")
    loaded = clip_core.load_model(tmp_path / "weights.safetensors", quick_gelu=False)
    assert loaded.transformer.resblocks[0].mlp.c_fc.out_features == 120


def _rewrite_weights(directory, edit) -> None:
    """Edit a checkpoint's tensors and record the new digest, as a checkpoint assembled by hand would."""
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")
    description = json.loads((directory / "config.json").read_text())
    description["weights_sha256"] = clip_core.checkpoint.file_sha256(directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(description))


def test_mismatched_shape_names_the_tensor_and_both_shapes(tmp_path):
    model = clip_core.create_model("tiny")
    directory = clip_core.save_checkpoint(model, tmp_path / "ckpt")
    _rewrite_weights(directory, lambda tensors: tensors.update(text_projection=torch.zeros(256, 128)))
    with pytest.raises(CheckpointError, match=r"'text_projection' has shape \(256, 128\) in .* but \(256, 256\) "
                                              r"in the model"):
        clip_core.load_model(directory)


def test_missing_tensors_are_named(tmp_path):
    directory = clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path / "ckpt")
    _rewrite_weights(directory, lambda tensors: tensors.pop("ln_final.bias"))
    with pytest.raises(CheckpointError, match="missing tensors: ln_final.bias"):
        clip_core.load_model(directory)


def test_non_clip_checkpoint_is_a_clear_error(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "resnet.pt")
    with pytest.raises(CheckpointError, match="is not a CLIP checkpoint.*fc.weight"):
        clip_core.load_model(tmp_path / "resnet.pt")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch, safetensors or TorchScript file"):
        clip_core.load_model(tmp_path / "notes.txt")
    # safetensors cut short (a copy interrupted), or something else under its name
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    (tmp_path / "cut.safetensors").write_bytes(weights.read_bytes()[:1000])
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    for name in ("cut.safetensors", "junk.safetensors"):
        with pytest.raises(CheckpointError, match=rf"{name} is not a readable safetensors file \(.*\): copy it"):
            clip_core.load_model(tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        clip_core.load_model(tmp_path / "absent")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        clip_core.load_model(tmp_path / "empty_dir")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickled_code_is_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Exploit()}, f, protocol=2)
    with pytest.raises(CheckpointError, match="no code runs from checkpoints"):
        clip_core.load_model(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def _write_torchscript_like_archive(path, record: bytes, numel: int, offset: int, size: tuple, stride: tuple,
                                    compress_type: int = zipfile.ZIP_STORED):
    """A TorchScript-shaped zip whose one float tensor is a view (`offset`, `size`, `stride`) of the storage
    record `record`, which data.pkl declares to hold `numel` floats."""
    storage, module = object(), types.ModuleType("__torch__")

    class Model:
        pass

    class Tensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict())

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is storage else None

    Model.__module__, Model.__qualname__, module.Model = "__torch__", "Model", Model
    root = Model()
    root.weight = Tensor()
    data_pkl = io.BytesIO()
    sys.modules["__torch__"] = module
    try:
        Pickler(data_pkl, protocol=2).dump(root)
    finally:
        del sys.modules["__torch__"]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl.getvalue())
        archive.writestr("archive/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("archive/data/0", record, compress_type=compress_type)
    return path


def test_torchscript_tensor_outside_its_storage_is_refused(tmp_path):
    floats = torch.arange(4, dtype=torch.float32)
    fitting = _write_torchscript_like_archive(tmp_path / "fits.pt", floats.numpy().tobytes(), 4, 1, (3,), (1,))
    torch.testing.assert_close(clip_core.checkpoint.read_torchscript_state_dict(fitting)["weight"], floats[1:])
    inflating = _write_torchscript_like_archive(tmp_path / "zeros.pt", bytes(2**22), 2**20, 0, (2**20,), (1,),
                                                compress_type=zipfile.ZIP_DEFLATED)  # 4 MiB in ~4 kB
    with pytest.raises(CheckpointError, match=r"storage record archive/data/0 inflates \d+ bytes to 4194304"):
        clip_core.load_model(inflating)
    short = _write_torchscript_like_archive(tmp_path / "short.pt", floats.numpy().tobytes(), 4096, 0, (64, 64), (64, 1))
    with pytest.raises(CheckpointError, match=r"short.pt: storage record archive/data/0 holds 16 bytes but declares "
                                              r"4096 .*the archive is malformed"):
        clip_core.load_model(short)
    for name, offset, size, stride in [("beyond", 0, (64, 64), (64, 1)), ("far", 10**12, (4,), (1,)),
                                       ("negative", -1, (4,), (1,)), ("strided", 0, (2, 2), (3, 1))]:
        archive = _write_torchscript_like_archive(tmp_path / f"{name}.pt", floats.numpy().tobytes(), 4,
                                                  offset, size, stride)
        with pytest.raises(CheckpointError, match=rf"{name}.pt: a tensor of size .* does not fit its storage of 4 "
                                                  "elements: the archive is malformed"):
            clip_core.load_model(archive)


def test_loading_at_another_resolution_interpolates_position_embeddings(tmp_path):
    for name, size, new_size, key, grid in [("tiny", 64, 96, "visual.positional_embedding", 12),
                                           ("RN50", 64, 128, "visual.attnpool.positional_embedding", 4)]:
        model = clip_core.create_model(name, image_size=size)
        directory = clip_core.save_checkpoint(model, tmp_path / name)
        bigger = clip_core.load_model(directory, image_size=new_size)
        assert bigger.config.vision.image_size == new_size
        assert bigger.state_dict()[key].shape[0] == grid * grid + 1
        torch.testing.assert_close(bigger.state_dict()[key][0], model.state_dict()[key][0])  # class token kept
        assert bigger.encode_image(torch.randn(1, 3, new_size, new_size)).shape == (1, model.config.embed_dim)


def test_future_checkpoint_format_asks_for_an_upgrade(tmp_path):
    directory = clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path)
    description = json.loads((directory / "config.json").read_text())
    description["format_version"] = 99
    (directory / "config.json").write_text(json.dumps(description))
    with pytest.raises(CheckpointError, match="upgrade rayclip"):
        clip_core.load_model(directory)


def test_oversized_json_files_are_refused_unread(tmp_path):
    directory = clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path)
    for name in ("config.json", "open_clip_config.json"):
        description = json.loads((directory / name).read_text())
        (directory / name).write_text(json.dumps(description) + " " * 2 * 2**20)
        with pytest.raises(CheckpointError, match=rf"{name} is larger than 1048576 bytes, the limit for a "
                                                  "checkpoint's JSON files"):
            clip_core.load_model(directory)
        (directory / name).unlink()


def test_weights_whose_digest_differs_from_the_recorded_one_are_refused(tmp_path):
    directory = clip_core.save_checkpoint(clip_core.create_model("tiny"), tmp_path / "ckpt")
    recorded = json.loads((directory / "config.json").read_text())["weights_sha256"]
    assert recorded == clip_core.checkpoint.file_sha256(directory / "model.safetensors")
    tensors = load_file(directory / "model.safetensors")
    tensors["ln_final.bias"] = tensors["ln_final.bias"] + 1e-3  # same shapes: only the digest can tell
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors has sha256 [0-9a-f]{64} but .*config.json records "
                                              + recorded):
        clip_core.load_model(directory)


@torch.no_grad()
def _assert_same_as_hf(ours, hf):
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    tokens = clip_core.get_tokenizer()(["a diagram", "a photo of a dog on a red sofa, taken at night"])
    theirs_image = hf.visual_projection(hf.vision_model(pixel_values=images).pooler_output)
    theirs_text = hf.text_projection(hf.text_model(input_ids=tokens).pooler_output)
    torch.testing.assert_close(ours.encode_image(images), theirs_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.encode_text(tokens), theirs_text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.logit_scale, hf.logit_scale)


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_a_hugging_face_clip_directory_loads_and_computes_what_transformers_computes(tmp_path, hidden_act):
    hf = hf_clip(hidden_act)
    hf.save_pretrained(tmp_path / "hf")
    ours = clip_core.load_model(tmp_path / "hf")
    assert ours.config.quick_gelu == (hidden_act == "quick_gelu")
    assert (ours.config.vision.heads, ours.config.text.heads) == (3, 2)
    assert ours.config.vision.image_size == 64 and ours.config.embed_dim == 32
    _assert_same_as_hf(ours, hf)
    # and back: our weights under transformers' names are the ones it saved
    exported = clip_core.checkpoint.hf_state_dict(ours.state_dict())
    saved = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported.keys() == {key for key in saved if not key.endswith("position_ids")}
    for key, value in exported.items():
        assert torch.equal(value, saved[key]), key


def test_an_older_hugging_face_configs_tower_dicts_win_as_they_do_in_transformers(tmp_path):
    """Configs written before transformers' `text_config` (some published ones carry both) say the
    towers' settings in `text_config_dict` / `vision_config_dict`; transformers reads those."""
    from transformers import CLIPModel

    hf_clip().save_pretrained(tmp_path / "hf")
    description = json.loads((tmp_path / "hf" / "config.json").read_text())
    for tower in ("text", "vision"):
        description[f"{tower}_config_dict"] = {**description[f"{tower}_config"], "hidden_act": "gelu"}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(description))
    reference = CLIPModel.from_pretrained(tmp_path / "hf").eval()
    assert reference.config.text_config.hidden_act == "gelu"
    ours = clip_core.load_model(tmp_path / "hf")
    assert not ours.config.quick_gelu
    _assert_same_as_hf(ours, reference)


def test_sharded_and_pickled_hugging_face_weights_load(tmp_path):
    hf = hf_clip()
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    _assert_same_as_hf(clip_core.load_model(tmp_path / "sharded"), hf)
    index = tmp_path / "sharded" / "model.safetensors.index.json"
    description = json.loads(index.read_text())
    first = next(iter(description["weight_map"]))
    index.write_text(json.dumps({**description, "weight_map": {**description["weight_map"],
                                                               first: "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="shards are .safetensors files beside it"):
        clip_core.load_model(tmp_path / "sharded")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_bytes((tmp_path / "sharded" / "config.json").read_bytes())
    torch.save(hf.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    _assert_same_as_hf(clip_core.load_model(tmp_path / "pickled"), hf)


def test_hugging_face_clip_that_clip_core_cannot_compute_is_refused_with_the_reason(tmp_path):
    hf_clip(layer_norm_eps=1e-6).save_pretrained(tmp_path / "eps")
    with pytest.raises(CheckpointError, match="layer_norm_eps"):
        clip_core.load_model(tmp_path / "eps")
    hf_clip().save_pretrained(tmp_path / "mean")
    (tmp_path / "mean" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(CheckpointError, match="image_mean"):
        clip_core.load_model(tmp_path / "mean")
    (tmp_path / "mean" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        clip_core.load_model(tmp_path / "mean")


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_export_hf_loads_in_transformers_with_its_processor_and_back_in_ours(tmp_path, quick_gelu):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    ours = clip_core.create_model("tiny", quick_gelu=quick_gelu).eval()
    directory = clip_core.export_hf(ours, tmp_path / "hf")
    hf = CLIPModel.from_pretrained(directory).eval()
    assert hf.config.text_config.hidden_act == ("quick_gelu" if quick_gelu else "gelu")
    _assert_same_as_hf(ours, hf)
    back = clip_core.load_model(directory)
    assert back.config == ours.config
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())

    # its processor tokenizes and preprocesses as clip_core does
    processor = CLIPProcessor.from_pretrained(directory)
    captions = ["a photo of a dog.", "Two  RED circles, and a blue square!", "clip art of shapes"]
    ids = processor.tokenizer(captions)["input_ids"]
    tokens = clip_core.get_tokenizer()(captions)
    for row, hf_ids in zip(tokens, ids):
        assert row[:len(hf_ids)].tolist() == hf_ids and not row[len(hf_ids):].any()
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8))
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    torch.testing.assert_close(pixels, clip_core.image_transform(64)(image), atol=0.05, rtol=0)


def test_export_hf_refuses_what_transformers_cannot_hold(tmp_path):
    with pytest.raises(CheckpointError, match="ModifiedResNet"):
        clip_core.export_hf(clip_core.create_model("RN50", image_size=64), tmp_path / "rn")
    with pytest.raises(CheckpointError, match="logit_bias"):
        clip_core.export_hf(clip_core.create_model("tiny", init_logit_bias=-10.0), tmp_path / "siglip")
