"""Checkpoint I/O: our safetensors directories, OpenAI, OpenCLIP and Hugging Face weights in,
OpenCLIP out.

Our checkpoint is a directory with `model.safetensors` (OpenAI key names), `config.json`
(model config, tokenizer, preprocessing) and `open_clip_config.json`, so the same directory
also loads in OpenCLIP as `open_clip.create_model("local-dir:<dir>")`.

Nothing here runs pickled code: `.pt` files load with `torch.load(weights_only=True)`, and
TorchScript archives (OpenAI's release format) are read by a restricted unpickler that only
rebuilds tensors.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import PRESETS, CLIPConfig, TextConfig, VisionConfig, canonical_name, get_config
from .model import CLIP
from .tokenizer import TOKENIZER_ID
from .transforms import OPENAI_MEAN, OPENAI_STD

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
OPENCLIP_CONFIG_FILE = "open_clip_config.json"
FORMAT = "rayclip.checkpoint"
FORMAT_VERSION = 1
# entries of OpenAI's archives that are not weights
_OPENAI_ONLY_KEYS = {"input_resolution", "context_length", "vocab_size"}
_NOT_WEIGHTS = re.compile(r"(^|\.)(attn_mask|input_resolution|context_length|vocab_size)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded, with what is wrong and where."""


# ---------------------------------------------------------------------------------------- save


def save_checkpoint(model: CLIP, directory: str | os.PathLike, *, extra: dict | None = None,
                    weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write `model` as a checkpoint directory (weights, config, OpenCLIP config). Returns the path.
    `weights` replaces the model's own state dict, e.g. a sharded model's gathered in full."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if weights is None else weights
    tensors = {key: value.detach().contiguous().cpu() for key, value in state.items()}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = model.config
    description = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config.to_dict(),
        "tokenizer": {"id": TOKENIZER_ID, "context_length": config.text.context_length},
        "preprocess": _preprocess_config(config),
        **(extra or {}),
        "weights_sha256": file_sha256(directory / WEIGHTS_FILE),  # checked at every load
    }
    (directory / CONFIG_FILE).write_text(json.dumps(description, indent=2) + "\n")
    (directory / OPENCLIP_CONFIG_FILE).write_text(json.dumps(
        {"model_cfg": openclip_model_config(config), "preprocess_cfg": _preprocess_config(config)}, indent=2) + "\n")
    return directory


def _read_json(path: Path, max_bytes: int = 2**20):
    """A checkpoint's JSON file, parsed; refused past `max_bytes`, since it is read whole and configs are small."""
    with open(path, "rb") as fp:
        data = fp.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise CheckpointError(f"{path} is larger than {max_bytes} bytes, the limit for a checkpoint's JSON files: "
                              "not read")
    try:
        return json.loads(data)
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as fp:
        return hashlib.file_digest(fp, "sha256").hexdigest()


def export_openclip(model: CLIP, path: str | os.PathLike) -> Path:
    """Write an OpenCLIP training-checkpoint file (`{"name", "state_dict"}`) that
    `open_clip.create_model(name, pretrained=path)` loads."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    torch.save({"name": model.config.name, "state_dict": state_dict}, path)
    return path


def _preprocess_config(config: CLIPConfig) -> dict:
    return {"size": config.vision.image_size, "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
            "interpolation": "bicubic", "resize_mode": "shortest"}


def openclip_model_config(config: CLIPConfig) -> dict:
    v, t = config.vision, config.text
    vision = {"image_size": v.image_size, "layers": list(v.layers) if v.is_resnet else v.layers,
              "width": v.width, "head_width": v.head_width, "mlp_ratio": v.mlp_ratio, "patch_size": v.patch_size}
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
            "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    out = {"embed_dim": config.embed_dim, "quick_gelu": config.quick_gelu, "vision_cfg": vision, "text_cfg": text}
    if config.init_logit_bias is not None:
        out["init_logit_bias"] = config.init_logit_bias
    return out


# OpenCLIP model_cfg keys beside the shapes read below: those that change nothing at any value (training
# only, or read only under another setting that is refused unless at its default), and those that change
# what a model computes, often without changing a weight's shape, at the values where it computes ours.
_OPENCLIP_INERT = {"patch_dropout", "output_tokens", "attn_pooler_queries", "attn_pooler_heads", "pad_id", "eos_id",
                   "timm_model_pretrained", "timm_pool", "timm_proj", "timm_proj_bias", "timm_drop", "timm_drop_path",
                   "hf_model_pretrained", "hf_proj_type", "hf_pooler_type", "cast_dtype"}
_OPENCLIP_OURS = {
    "model": {"custom_text": False, "multimodal_cfg": None},
    "vision_cfg": {"pool_type": "tok", "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
                   "timm_model_name": None},
    "text_cfg": {"pool_type": "argmax", "no_causal_mask": False, "embed_cls": False, "proj_type": "linear",
                 "proj_bias": False, "hf_model_name": None, "hf_tokenizer_name": None, "tokenizer_mode": None,
                 "tokenizer_kwargs": None},
    "both": {"ls_init_value": None, "final_ln_after_pool": False, "act_kwargs": None, "norm_kwargs": None,
             "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
             "scale_attn_inner": False, "scale_attn": False, "scale_fc": False},
}
_OPENCLIP_SHAPES = {"model": {"embed_dim", "quick_gelu", "vision_cfg", "text_cfg", "init_logit_bias",
                              "init_logit_scale"},
                    "vision_cfg": {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio"},
                    "text_cfg": {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}}


def _check_openclip_settings(model_cfg: dict, source: str) -> None:
    """Refuse an OpenCLIP model_cfg that asks for a model clip_core does not build: such a model would
    often load (same shapes) and embed differently."""
    problems = []
    for section, values in (("model", model_cfg), ("vision_cfg", model_cfg.get("vision_cfg") or {}),
                            ("text_cfg", model_cfg.get("text_cfg") or {})):
        ours = {**_OPENCLIP_OURS[section], **(_OPENCLIP_OURS["both"] if section != "model" else {})}
        for key, value in values.items():
            if key in _OPENCLIP_SHAPES[section] or key in _OPENCLIP_INERT:
                continue
            if key not in ours:
                problems.append(f"{section}.{key} (a setting clip_core does not know)")
            elif value != ours[key] and not (ours[key] in (None, False) and not value):
                problems.append(f"{section}.{key}={value!r} (clip_core builds {ours[key]!r})")
    if problems:
        raise CheckpointError(f"{source} describes a model clip_core does not build: {'; '.join(problems)}. "
                              "Load it with open_clip instead")


# what clip_core's transforms do to an image (OpenAI's preprocessing): the values weights trained on
# other inputs would state
_OUR_INPUTS = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "image_mean": list(OPENAI_MEAN),
               "image_std": list(OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest"}


def _check_inputs(source: str, **stated) -> None:
    """Refuse weights whose preprocessing (as `source` states it; None: not stated, the default) is not
    clip_core's: they would load and embed other inputs than they were trained on (laion's ViT-L-14
    normalises with 0.5, DFN's ViT-H-14 squashes the image to the square)."""
    for key, value in stated.items():
        ours = _OUR_INPUTS[key]
        if value is None:
            continue
        differs = (len(value) != 3 or any(abs(a - b) > 1e-4 for a, b in zip(value, ours))) \
            if isinstance(ours, list) else value != ours
        if differs:
            raise CheckpointError(f"{source} preprocesses with {key} {value!r}; clip_core's transforms use "
                                  f"{ours!r} (OpenAI's), so these weights would see other inputs than they "
                                  "were trained on: load them with open_clip instead")


def _from_openclip_config(model_cfg: dict, name: str | None) -> CLIPConfig:
    v, t = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    layers = v.get("layers", 12)
    vision = VisionConfig(
        image_size=v.get("image_size", 224), layers=tuple(layers) if isinstance(layers, (list, tuple)) else layers,
        width=v.get("width", 768), patch_size=v.get("patch_size") if not isinstance(layers, (list, tuple)) else None,
        head_width=v.get("head_width", 64), mlp_ratio=v.get("mlp_ratio", 4.0))
    text = TextConfig(context_length=t.get("context_length", 77), vocab_size=t.get("vocab_size", 49408),
                      width=t.get("width", 512), heads=t.get("heads", 8), layers=t.get("layers", 12),
                      mlp_ratio=t.get("mlp_ratio", 4.0))
    return CLIPConfig(name=name, embed_dim=model_cfg["embed_dim"], vision=vision, text=text,
                      quick_gelu=bool(model_cfg.get("quick_gelu", False)),
                      init_logit_bias=model_cfg.get("init_logit_bias"))


# ---------------------------------------------------------------------------------------- load


def load_model(path: str | os.PathLike, *, quick_gelu: bool | None = None, image_size: int | None = None,
               device: str | torch.device = "cpu") -> CLIP:
    """Load a CLIP model from any of the formats users hold, inferring the architecture.

    - our checkpoint directory (`config.json` + `model.safetensors`), or an OpenCLIP local dir
      (`open_clip_config.json` + weights);
    - a Hugging Face `transformers` CLIPModel directory (`config.json` with `"model_type": "clip"`,
      `model.safetensors`, sharded or `pytorch_model.bin`), as `save_pretrained` writes it;
    - an OpenAI release: a TorchScript archive or a plain state dict (`.pt`);
    - an OpenCLIP training checkpoint (`{"name", "state_dict"}`, optional `module.` prefix);
    - a bare state dict (`.safetensors`, `.pt`, `.bin`).

    `quick_gelu` overrides the activation the checkpoint implies (OpenAI weights need QuickGELU;
    OpenCLIP's `name` says which); `image_size` loads at another resolution, interpolating the
    vision position embedding.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        config, state_dict = _read_directory(path, quick_gelu)
    else:
        config, state_dict = _read_file(path, quick_gelu)
    if image_size is not None and image_size != config.vision.image_size:
        config = config.replace(vision=dataclasses.replace(config.vision, image_size=image_size))
        state_dict = resize_pos_embed(state_dict, config)
    model = CLIP(config)
    load_weights(model, state_dict, source=str(path))
    return model.to(device).eval()


def load_weights(model: CLIP, state_dict: dict[str, torch.Tensor], *, source: str = "the checkpoint") -> None:
    """Copy `state_dict` into `model`, naming every missing, unexpected or mis-shaped tensor."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"'{key}' has shape {tuple(state_dict[key].shape)} in {source} but {tuple(value.shape)} in the model"
                  for key, value in expected.items() if key in state_dict and state_dict[key].shape != value.shape]
    problems = []
    if mismatched:
        problems.append("; ".join(mismatched))
    if missing:
        problems.append(f"missing tensors: {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_few(unexpected)}")
    if problems:
        name = model.config.name or "the model"
        raise CheckpointError(f"{source} does not fit {name}: " + ". ".join(problems))
    model.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def described_config(description: dict, directory: str) -> CLIPConfig:
    """The model config in the `config.json` (parsed: `description`) of the checkpoint at `directory`."""
    if description.get("format") != FORMAT or "model" not in description:
        raise CheckpointError(f"{directory}/{CONFIG_FILE} is not a rayclip checkpoint config "
                              f"(expected \"format\": \"{FORMAT}\" and a \"model\" section)")
    if description.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{directory} has checkpoint format version {description['format_version']}; "
                              f"this rayclip reads up to {FORMAT_VERSION}: upgrade rayclip")
    return CLIPConfig.from_dict(description["model"])


def _read_directory(path: Path, quick_gelu: bool | None) -> tuple[CLIPConfig, dict]:
    if (path / CONFIG_FILE).is_file():
        description = _read_json(path / CONFIG_FILE)
        if is_hf_config(description):
            config, state_dict = _read_hf_directory(path, description)
            return (config.replace(quick_gelu=quick_gelu) if quick_gelu is not None else config), state_dict
        config = described_config(description, str(path))
        weights = path / WEIGHTS_FILE
        if not weights.is_file():
            raise CheckpointError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
        recorded = description.get("weights_sha256")
        if recorded is not None and (actual := file_sha256(weights)) != recorded:
            raise CheckpointError(f"{weights} has sha256 {actual} but {path / CONFIG_FILE} records {recorded}: the "
                                  "weights were changed or damaged after they were saved; copy the checkpoint again")
        state_dict = _load_safetensors(weights)
    elif (path / OPENCLIP_CONFIG_FILE).is_file():
        described = _read_json(path / OPENCLIP_CONFIG_FILE)
        model_cfg = described.get("model_cfg")
        if not model_cfg:
            raise CheckpointError(f"{path / OPENCLIP_CONFIG_FILE} has no 'model_cfg' section")
        weights = next((path / name for name in ("open_clip_model.safetensors", WEIGHTS_FILE,
                                                 "open_clip_pytorch_model.bin") if (path / name).is_file()), None)
        if weights is None:
            raise CheckpointError(f"{path} has {OPENCLIP_CONFIG_FILE} but no open_clip_model.safetensors, "
                                  f"{WEIGHTS_FILE} or open_clip_pytorch_model.bin")
        _check_openclip_settings(model_cfg, str(path / OPENCLIP_CONFIG_FILE))
        preprocess = described.get("preprocess_cfg") or {}  # OpenCLIP's PreprocessCfg; its defaults are ours
        _check_inputs(str(path / OPENCLIP_CONFIG_FILE), mean=preprocess.get("mean"), std=preprocess.get("std"),
                      interpolation=preprocess.get("interpolation"), resize_mode=preprocess.get("resize_mode"))
        config = _from_openclip_config(model_cfg, name=None)
        state_dict = _read_weights(weights)[0]
    else:
        raise CheckpointError(f"{path} is a directory without {CONFIG_FILE} or {OPENCLIP_CONFIG_FILE}: "
                              "not a checkpoint directory (ours, OpenCLIP's or a Hugging Face CLIPModel's)")
    if quick_gelu is not None:
        config = config.replace(quick_gelu=quick_gelu)
    return config, state_dict


def _read_file(path: Path, quick_gelu: bool | None) -> tuple[CLIPConfig, dict]:
    """Weights from one file; the architecture from their shapes, the activation from any hint."""
    state_dict, hint_quick_gelu, name = _read_weights(path)
    if quick_gelu is None:
        quick_gelu = hint_quick_gelu
    config = config_from_state_dict(state_dict, quick_gelu=bool(quick_gelu), source=str(path))
    if quick_gelu is None:
        warnings.warn(f"{path} does not say whether it was trained with QuickGELU (OpenAI) or GELU; assuming "
                      "GELU. Say which with quick_gelu=True or False (rayclip's --quick-gelu or --no-quick-gelu): "
                      "weights derived from OpenAI's release need QuickGELU.", stacklevel=3)
    if isinstance(name, str):
        try:
            config = config.replace(name=canonical_name(name)[0] + ("-quickgelu" if quick_gelu else ""))
        except ValueError:
            config = config.replace(name=name)
    return config, state_dict


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except SafetensorError as exc:  # cut short, or not safetensors at all
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}): copy it again") from exc


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], bool | None, str | None]:
    """(state dict, QuickGELU hint, model name) from a safetensors, TorchScript or torch.save file."""
    hint_quick_gelu, name = None, None
    if path.suffix == ".safetensors":
        state_dict = _load_safetensors(path)
    elif _is_torchscript(path):
        state_dict, hint_quick_gelu = read_torchscript_state_dict(path), True  # OpenAI's release format
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"{path} holds objects other than tensors and plain containers, which are not "
                                  f"loaded (no code runs from checkpoints): {exc}") from exc
        except Exception as exc:  # torch.load raises many kinds on files that are not its own
            raise CheckpointError(f"{path} is not a PyTorch, safetensors or TorchScript file: {exc!r}") from exc
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # OpenCLIP's training format
            name = _trained_model(loaded["name"]) if isinstance(loaded.get("name"), str) else None
            if name:
                hint_quick_gelu = name.lower().endswith("-quickgelu")
            state_dict = loaded["state_dict"]
        else:
            state_dict = loaded
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    state_dict = _strip_module(state_dict)
    if hint_quick_gelu is None and _OPENAI_ONLY_KEYS & set(state_dict):
        hint_quick_gelu = True  # only OpenAI's release carries these
    state_dict = {k: v for k, v in state_dict.items() if not _NOT_WEIGHTS.search(k)}
    return state_dict, hint_quick_gelu, name


def _trained_model(run_name: str) -> str | None:
    """The model an OpenCLIP training checkpoint's `name` (its run's --name) names: by default
    open_clip_train's `<date>-model_<model>-lr_<lr>-b_…`; a name of the user's own names none (None)
    unless it is a model's."""
    match = re.search(r"-model_(.+?)-lr_", run_name)
    model = match.group(1) if match else run_name
    try:
        canonical_name(model)
    except ValueError:
        return model if match else None
    return model


def _mlp_ratio(hidden: int, width: int) -> float:
    """The mlp_ratio whose hidden width the model builds (int(width * ratio), as OpenCLIP's) is `hidden`:
    hidden / width, unless float rounding puts that product just under it (width 88, hidden 120: 119.99…)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _strip_module(state_dict: dict) -> dict:
    if state_dict and all(key.startswith("module.") for key in state_dict):
        return {key[len("module."):]: value for key, value in state_dict.items()}
    return state_dict


# ----------------------------------------------------------------------- Hugging Face transformers

# (ours, transformers' CLIPModel): whole names or prefixes; the blocks' parts below them
_HF_NAMES = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
             ("ln_final.", "text_model.final_layer_norm."),
             ("transformer.resblocks.", "text_model.encoder.layers."),
             ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
             ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
             ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
             ("visual.ln_pre.", "vision_model.pre_layrnorm."),
             ("visual.ln_post.", "vision_model.post_layernorm."),
             ("visual.transformer.resblocks.", "vision_model.encoder.layers."),
             ("logit_scale", "logit_scale")]
_HF_BLOCK_PARTS = [("attn.out_proj.", "self_attn.out_proj."), ("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."),
                   ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")]
_HF_TRANSPOSED = [("text_projection", "text_projection.weight"), ("visual.proj", "visual_projection.weight")]
_HF_QKV = re.compile(r"^(.*\.)self_attn\.([qkv])_proj\.(weight|bias)$")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def is_hf_config(description: dict) -> bool:
    """Whether a parsed `config.json` is a Hugging Face transformers CLIPModel's."""
    return description.get("model_type") == "clip"


def _rename(key: str, pairs, source: int) -> str | None:
    for pair in pairs:
        if key == pair[source] or (pair[source].endswith(".") and key.startswith(pair[source])):
            return pair[1 - source] + key[len(pair[source]):]
    return None


def hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (OpenAI-named) ViT CLIP weights under transformers' CLIPModel names."""
    out = {}
    for key, value in state_dict.items():
        transposed = _rename(key, _HF_TRANSPOSED, 0)
        if transposed:
            out[transposed] = value.T
            continue
        renamed = _rename(key, _HF_NAMES, 0)
        if renamed is None:
            raise CheckpointError(f"'{key}' has no counterpart in transformers' CLIPModel, which has neither a "
                                  "ResNet tower nor a logit_bias")
        block, _, part = renamed.partition(".layers.")
        if part:
            index, _, rest = part.partition(".")
            if rest.startswith("attn.in_proj_"):
                for letter, chunk in zip("qkv", value.chunk(3)):
                    out[f"{block}.layers.{index}.self_attn.{letter}_proj.{rest.rsplit('_', 1)[1]}"] = chunk
                continue
            renamed = f"{block}.layers.{index}.{_rename(rest, _HF_BLOCK_PARTS, 0) or rest}"
        out[renamed] = value
    return out


def _from_hf_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPModel weights under our (OpenAI's) names; names it does not know pass unchanged,
    for load_weights to report."""
    out, qkv = {}, {}
    for key, value in state_dict.items():
        if key.endswith("position_ids"):  # a buffer older transformers saved
            continue
        if match := _HF_QKV.match(key):
            qkv.setdefault((match[1], match[3]), {})[match[2]] = value
            continue
        transposed = _rename(key, _HF_TRANSPOSED, 1)
        if transposed:
            out[transposed] = value.T
            continue
        block, _, part = key.partition(".layers.")
        if part:
            index, _, rest = part.partition(".")
            key = f"{block}.layers.{index}.{_rename(rest, _HF_BLOCK_PARTS, 1) or rest}"
        out[_rename(key, _HF_NAMES, 1) or key] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != set("qkv"):
            raise CheckpointError(f"attention at '{prefix}' has only the {sorted(parts)} projections")
        out[(_rename(prefix, _HF_NAMES, 1) or prefix) + f"attn.in_proj_{kind}"] = torch.cat([parts[x] for x in "qkv"])
    return out


def _hf_tower_config(description: dict, tower: str, defaults: dict) -> dict:
    """A tower's settings as transformers' CLIPConfig reads them: its own defaults where a field is left
    out, and an older config's `<tower>_config_dict`, where present, in place of `<tower>_config`."""
    legacy = description.get(f"{tower}_config_dict")
    return {"layer_norm_eps": 1e-5, **defaults, **(legacy if legacy is not None
                                                   else description.get(f"{tower}_config") or {})}


def _read_hf_directory(path: Path, description: dict) -> tuple[CLIPConfig, dict]:
    """A transformers CLIPModel directory: its weights renamed, the architecture from their shapes and the
    heads, activation and normalisation from its config files."""
    weights = next((path / name for name in _HF_WEIGHTS if (path / name).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has a Hugging Face CLIP {CONFIG_FILE} but none of {', '.join(_HF_WEIGHTS)}")
    if weights.name.endswith(".index.json"):
        state_dict = {}
        for shard in sorted(set(_read_json(weights)["weight_map"].values())):
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise CheckpointError(f"{weights} names the shard {shard!r}: shards are .safetensors files beside it")
            state_dict.update(_load_safetensors(path / shard))
    else:
        state_dict = _read_weights(weights)[0]
    text = _hf_tower_config(description, "text", {"hidden_act": "quick_gelu", "num_attention_heads": 8})
    vision = _hf_tower_config(description, "vision", {"hidden_act": "quick_gelu", "num_attention_heads": 12})
    activations = {text["hidden_act"], vision["hidden_act"]}
    if len(activations) > 1 or not activations <= {"gelu", "quick_gelu"}:
        raise CheckpointError(f"{path / CONFIG_FILE}: the towers' hidden_act {sorted(activations)} is not one of "
                              "gelu or quick_gelu for both: clip_core's CLIP has one activation for both towers")
    if {text["layer_norm_eps"], vision["layer_norm_eps"]} != {1e-5}:
        raise CheckpointError(f"{path / CONFIG_FILE}: layer_norm_eps {text['layer_norm_eps']} / "
                              f"{vision['layer_norm_eps']}; clip_core's CLIP normalises with 1e-5")
    preprocessor = path / "preprocessor_config.json"
    if preprocessor.is_file():
        described = _read_json(preprocessor)
        _check_inputs(str(preprocessor), image_mean=described.get("image_mean"), image_std=described.get("image_std"))
    state_dict = _from_hf_state_dict(state_dict)
    config = config_from_state_dict(state_dict, quick_gelu=activations == {"quick_gelu"}, source=str(path),
                                    text_heads=text["num_attention_heads"], vision_heads=vision["num_attention_heads"])
    return config, state_dict


def export_hf(model: CLIP, directory: str | os.PathLike) -> Path:
    """Write a ViT CLIP as a Hugging Face transformers CLIPModel directory, in `save_pretrained`'s layout
    (weights, config, image-processor and tokenizer files): `CLIPModel.from_pretrained` and
    `CLIPProcessor.from_pretrained` load it, and so does `load_model`."""
    from .tokenizer import get_tokenizer

    config, v, t = model.config, model.config.vision, model.config.text
    if v.is_resnet:
        raise CheckpointError(f"{config.name or 'this model'} has a ModifiedResNet image tower, which transformers' "
                              "CLIPModel lacks: only ViT CLIPs export to it (export_openclip takes any)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = hf_state_dict({key: value.detach() for key, value in model.state_dict().items()})
    save_file({key: value.cpu().contiguous() for key, value in weights.items()}, directory / WEIGHTS_FILE,
              metadata={"format": "pt"})
    act = "quick_gelu" if config.quick_gelu else "gelu"
    tower = {"hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": config.embed_dim}
    description = {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": config.embed_dim,
        "text_config": {**tower, "vocab_size": t.vocab_size, "hidden_size": t.width, "num_attention_heads": t.heads,
                        "intermediate_size": round(t.width * t.mlp_ratio), "num_hidden_layers": t.layers,
                        "max_position_embeddings": t.context_length, "bos_token_id": 49406, "eos_token_id": 49407},
        "vision_config": {**tower, "hidden_size": v.width, "num_attention_heads": v.heads,
                          "intermediate_size": round(v.width * v.mlp_ratio), "num_hidden_layers": v.layers,
                          "image_size": v.image_size, "patch_size": v.patch_size, "num_channels": 3}}
    size = v.image_size
    processor = {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
                 "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # bicubic
                 "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
                 "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_MEAN),
                 "image_std": list(OPENAI_STD), "do_convert_rgb": True}
    tokenizer = get_tokenizer()
    names = {tokenizer.sot_token_id: "<|startoftext|>", tokenizer.eot_token_id: "<|endoftext|>"}  # OpenAI's
    vocab = {names.get(i, token): i for token, i in tokenizer.encoder.items()}
    merges = sorted(tokenizer._ranks, key=tokenizer._ranks.get)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    files = {CONFIG_FILE: description, "preprocessor_config.json": processor, "vocab.json": vocab,
             "tokenizer_config.json": {"tokenizer_class": "CLIPTokenizer", "model_max_length": t.context_length,
                                       "processor_class": "CLIPProcessor", **special},
             "special_tokens_map.json": special}
    for name, content in files.items():
        (directory / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
                                          encoding="utf-8")
    return directory


def described_image_size(description: dict, directory: str) -> int:
    """The input resolution a checkpoint directory's parsed `config.json` states (ours or transformers')."""
    if is_hf_config(description):
        return int((description.get("vision_config") or {}).get("image_size", 224))
    return described_config(description, directory).vision.image_size


# ----------------------------------------------------------------------- architecture from shapes


# OpenCLIP's ViTs whose heads are not OpenAI's 64 wide, by (width, layers, patch size) (its model_configs/):
# a bare state dict does not say its heads, and with the wrong count every shape still fits
OPENCLIP_HEAD_WIDTHS = {(1280, 32, 14): 80, (1280, 32, 16): 80, (1408, 40, 14): 88, (1664, 48, 14): 104,
                        (1792, 56, 14): 112}


def config_from_state_dict(state_dict: dict[str, torch.Tensor], *, quick_gelu: bool = False,
                           source: str = "the state dict", text_heads: int | None = None,
                           vision_heads: int | None = None) -> CLIPConfig:
    """The architecture a CLIP state dict was built with, read off its tensor shapes; the heads, which
    shapes do not show, are OpenAI's 64 wide unless given or the shapes are one of OpenCLIP's wider-headed
    ViTs (ViT-H, -g, -bigG, -e)."""
    required = ["token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight",
                "logit_scale"]
    missing = [key for key in required if key not in state_dict]
    if missing or not any(key.startswith("visual.") for key in state_dict):
        sample = ", ".join(list(state_dict)[:6]) or "nothing"
        raise CheckpointError(f"{source} is not a CLIP checkpoint: it lacks {missing or ['visual.*']} "
                              f"(its keys begin: {sample})")
    sd = state_dict
    if "visual.proj" in sd:
        width = sd["visual.conv1.weight"].shape[0]
        patch_size = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = _count_blocks(sd, "visual.transformer.resblocks.")
        head_width = OPENCLIP_HEAD_WIDTHS.get((width, layers, patch_size), 64)
        hidden = sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
        vision = VisionConfig(image_size=patch_size * grid, layers=layers, width=width, patch_size=patch_size,
                              head_width=width // (vision_heads or width // head_width),
                              mlp_ratio=_mlp_ratio(hidden, width))
    elif "visual.attnpool.positional_embedding" in sd:
        layers = tuple(_count_blocks(sd, f"visual.layer{stage}.") for stage in (1, 2, 3, 4))
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = VisionConfig(image_size=grid * 32, layers=layers, width=sd["visual.layer1.0.conv1.weight"].shape[0],
                              patch_size=None)
    else:
        raise CheckpointError(f"{source} has a vision tower that is neither a ViT (visual.proj) nor a "
                              "ModifiedResNet (visual.attnpool)")
    text_width = sd["ln_final.weight"].shape[0]
    text = TextConfig(context_length=sd["positional_embedding"].shape[0],
                      vocab_size=sd["token_embedding.weight"].shape[0], width=text_width,
                      heads=text_heads or text_width // 64, layers=_count_blocks(sd, "transformer.resblocks."),
                      mlp_ratio=_mlp_ratio(sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], text_width))
    logit_bias = float(sd["logit_bias"]) if "logit_bias" in sd else None
    config = CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=vision, text=text,
                        quick_gelu=quick_gelu, init_logit_bias=logit_bias)
    return config.replace(name=_preset_name(config))


def _count_blocks(sd: dict, prefix: str) -> int:
    return len({key[len(prefix):].split(".")[0] for key in sd if key.startswith(prefix)})


def _preset_name(config: CLIPConfig) -> str | None:
    """The preset with exactly this architecture, if any."""
    for name in PRESETS:
        preset = get_config(name, quick_gelu=config.quick_gelu)
        if preset.replace(name=None, init_logit_bias=None) == config.replace(name=None, init_logit_bias=None):
            return preset.name
    return None


def resize_pos_embed(state_dict: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Bicubically interpolate the vision position embedding to `config`'s grid (class token kept)."""
    v = config.vision
    key = "visual.attnpool.positional_embedding" if v.is_resnet else "visual.positional_embedding"
    new_grid = v.image_size // (32 if v.is_resnet else v.patch_size)
    old = state_dict[key]
    old_grid = round((old.shape[0] - 1) ** 0.5)
    if old_grid == new_grid:
        return state_dict
    cls, grid = old[:1], old[1:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid * new_grid, -1).to(old.dtype)
    return {**state_dict, key: torch.cat([cls, grid])}


# ----------------------------------------------------------------------------- TorchScript


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a TorchScript class while its attributes are read; never runs its code."""

    def __init__(self, *args):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"": state}


class _RestrictedUnpickler(pickle.Unpickler):
    @staticmethod
    def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        """A view of `storage`, refused unless it lies inside: `set_` would grow the storage with
        uninitialised memory (the loading process's heap) to fit it."""
        untyped, dtype = storage
        numel = untyped.nbytes() // dtype.itemsize
        if not _view_fits(numel, offset, size, stride):
            raise CheckpointError(f"a tensor of size {size!r} and stride {stride!r} at offset {offset!r} does not "
                                  f"fit its storage of {numel} elements: the archive is malformed")
        return torch.empty(0, dtype=dtype).set_(untyped, offset, size, stride)

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("collections", "OrderedDict"): dict,
    }

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str):
        super().__init__(file)
        self._archive, self._prefix = archive, prefix

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return self._ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name.startswith("build_"):
            return lambda data: data
        if module.startswith("__torch__"):
            return type(name, (_ScriptObject,), {})
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only tensors are read from TorchScript")

    def persistent_load(self, pid):
        kind, dtype, key, _location, numel = pid
        if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(numel, int):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r}")
        record = f"{self._prefix}data/{key}"
        try:
            info = self._archive.getinfo(record)
        except KeyError:
            raise CheckpointError(f"storage record {record} is missing: the archive is malformed") from None
        stored = info.file_size
        if info.compress_type != zipfile.ZIP_STORED and stored > 100 * max(info.compress_size, 1):
            # torch writes records uncompressed; megabytes of deflated zeros would inflate to gigabytes
            raise CheckpointError(f"storage record {record} inflates {info.compress_size} bytes to {stored}: not "
                                  "a TorchScript archive as torch writes one")
        if stored != numel * dtype.itemsize:
            raise CheckpointError(f"storage record {record} holds {stored} bytes but declares {numel} {dtype} "
                                  f"elements ({numel * dtype.itemsize} bytes): the archive is malformed")
        data = bytearray(self._archive.read(record))
        untyped = torch.UntypedStorage.from_buffer(data, dtype=torch.uint8) if data else torch.UntypedStorage(0)
        return untyped, dtype


def _view_fits(numel: int, offset, size, stride) -> bool:
    """Whether a strided view lies inside a storage of `numel` elements (an empty view always does)."""
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
            and all(isinstance(n, int) and n >= 0 for n in (offset, *size, *stride))):
        return False
    return 0 in size or offset + sum((n - 1) * s for n, s in zip(size, stride)) < numel


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The named tensors of a TorchScript archive (as OpenAI released CLIP), without running it."""
    with zipfile.ZipFile(path) as archive:
        data_pkl = next((name for name in archive.namelist() if name.endswith("data.pkl")
                         and name.count("/") == 1), None)
        if data_pkl is None:
            raise CheckpointError(f"{path} is a zip archive without a TorchScript data.pkl")
        prefix = data_pkl[: -len("data.pkl")]
        with archive.open(data_pkl) as fp:
            try:
                root = _RestrictedUnpickler(fp, archive, prefix).load()
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from None
    state_dict: dict[str, torch.Tensor] = {}

    def collect(obj, key_prefix: str) -> None:
        for name, value in obj.state.items():
            if isinstance(value, torch.Tensor):
                state_dict[key_prefix + name] = value
            elif isinstance(value, _ScriptObject):
                collect(value, f"{key_prefix}{name}.")

    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path} is not a TorchScript module archive")
    collect(root, "")
    return state_dict
