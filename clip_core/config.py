"""Model configurations and the named presets.

A config is the whole description of an architecture: the model is built from it
and nothing else, and it is what `config.json` stores beside the weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    # an int is a ViT depth; four ints are the stage depths of a ModifiedResNet
    layers: int | tuple[int, int, int, int] = 12
    # ViT: transformer width; ResNet: channels of the first stage (the stem is width // 2)
    width: int = 768
    # ViT only; None for a ModifiedResNet
    patch_size: int | None = 32
    head_width: int = 64
    mlp_ratio: float = 4.0

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, tuple)

    @property
    def heads(self) -> int:
        # a ResNet's attention pool runs on the last stage's width * 32 channels
        return (self.width * 32 if self.is_resnet else self.width) // self.head_width


@dataclass(frozen=True)
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0


@dataclass(frozen=True)
class CLIPConfig:
    # the preset this config came from (with "-quickgelu" when that applies), or None
    name: str | None = None
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    # OpenAI's released weights were trained with x * sigmoid(1.702 x); everything else uses GELU
    quick_gelu: bool = False
    init_logit_scale: float = math.log(1 / 0.07)
    # a learnable logit bias, as SigLIP's sigmoid loss needs; None for the softmax CLIP loss
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        v, t = self.vision, self.text
        problems = []
        for name, value, kind in (("embed_dim", self.embed_dim, int), ("vision.image_size", v.image_size, int),
                                  ("vision.width", v.width, int), ("vision.head_width", v.head_width, int),
                                  ("vision.mlp_ratio", v.mlp_ratio, (int, float)), ("text.width", t.width, int),
                                  ("text.heads", t.heads, int), ("text.mlp_ratio", t.mlp_ratio, (int, float))):
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                problems.append(f"{name} must be a positive {'number' if kind is not int else 'int'}, got {value!r}")
        if not isinstance(self.quick_gelu, bool):
            problems.append(f"quick_gelu must be true or false, got {self.quick_gelu!r}")
        if problems:  # the checks below divide by these
            raise ValueError("invalid CLIP config: " + "; ".join(problems))
        if v.is_resnet:
            if len(v.layers) != 4 or any(n <= 0 for n in v.layers):
                problems.append(f"vision.layers of a ResNet must be four positive ints, got {v.layers}")
            if v.image_size % 32:
                problems.append(f"a ResNet's vision.image_size must be a multiple of 32, got {v.image_size}")
            if (v.width * 32) % v.head_width:
                problems.append(f"ResNet width * 32 ({v.width * 32}) must be divisible by head_width ({v.head_width})")
        else:
            if not isinstance(v.layers, int) or v.layers <= 0:
                problems.append(f"vision.layers must be a positive int (ViT) or four ints (ResNet), got {v.layers!r}")
            if not v.patch_size or v.patch_size <= 0:
                problems.append(f"a ViT needs a positive vision.patch_size, got {v.patch_size}")
            elif v.image_size % v.patch_size:
                problems.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
            if v.width % v.head_width:
                problems.append(f"vision.width {v.width} is not divisible by head_width {v.head_width}")
        if t.width % t.heads:
            problems.append(f"text.width {t.width} is not divisible by text.heads {t.heads}")
        if t.context_length <= 0 or t.layers <= 0:
            problems.append("text.context_length and text.layers must be positive")
        if t.vocab_size != TextConfig.vocab_size:  # another tokenizer's ids: the text tower would embed nonsense
            problems.append(f"text.vocab_size is {t.vocab_size}, but clip_core tokenizes with CLIP's BPE, "
                            f"{TextConfig.vocab_size} ids (a model made with another tokenizer, MetaCLIP 2's "
                            "XLM-V say, needs that tokenizer: load it with open_clip)")
        if problems:
            raise ValueError("invalid CLIP config: " + "; ".join(problems))

    @property
    def image_size(self) -> int:
        """The input resolution (`vision.image_size`): what `image_transform` takes."""
        return self.vision.image_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CLIPConfig:
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CLIP config keys {unknown}; known keys are {sorted(known)}")
        vision = dict(data.pop("vision", {}))
        if isinstance(vision.get("layers"), list):
            vision["layers"] = tuple(vision["layers"])
        return cls(vision=_build(VisionConfig, vision, "vision"),
                   text=_build(TextConfig, data.pop("text", {}), "text"), **data)

    def replace(self, **changes) -> CLIPConfig:
        return dataclasses.replace(self, **changes)


def _build(kind, values: dict, section: str):
    known = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the '{section}' section; known keys are {sorted(known)}")
    return kind(**values)


def _resnet(embed_dim, image_size, layers, width, text_width, text_heads) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, layers=layers, width=width, patch_size=None),
        text=TextConfig(width=text_width, heads=text_heads),
    )


def _vit(embed_dim, image_size, layers, width, patch_size, text_width, text_heads, text_layers=12) -> CLIPConfig:
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, layers=layers, width=width, patch_size=patch_size),
        text=TextConfig(width=text_width, heads=text_heads, layers=text_layers),
    )


# The published shapes (Radford et al. 2021, table 19/20 and OpenAI's release).
PRESETS: dict[str, CLIPConfig] = {
    "RN50": _resnet(1024, 224, (3, 4, 6, 3), 64, 512, 8),
    "RN101": _resnet(512, 224, (3, 4, 23, 3), 64, 512, 8),
    "RN50x4": _resnet(640, 288, (4, 6, 10, 6), 80, 640, 10),
    "RN50x16": _resnet(768, 384, (6, 8, 18, 8), 96, 768, 12),
    "RN50x64": _resnet(1024, 448, (3, 15, 36, 10), 128, 1024, 16),
    "ViT-B-32": _vit(512, 224, 12, 768, 32, 512, 8),
    "ViT-B-16": _vit(512, 224, 12, 768, 16, 512, 8),
    "ViT-L-14": _vit(768, 224, 24, 1024, 14, 768, 12),
    "ViT-L-14-336": _vit(768, 336, 24, 1024, 14, 768, 12),
    # CPU-sized: `tiny` trains on 2 CPUs in minutes
    "tiny": _vit(256, 64, 6, 256, 8, 256, 4, text_layers=6),
    "small": _vit(256, 128, 8, 384, 8, 384, 6, text_layers=8),
}

_ALIASES = {"ViT-L-14@336px": "ViT-L-14-336"}


def canonical_name(name: str) -> tuple[str, bool]:
    """Map any accepted spelling to (preset name, quick_gelu requested).

    Accepts OpenAI's spelling (`ViT-B/32`, `ViT-L/14@336px`), OpenCLIP's (`ViT-B-32`,
    `ViT-L-14-336`) and OpenCLIP's `-quickgelu` suffix.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    spelled = name.strip().replace("/", "-")
    quick_gelu = False
    match = re.fullmatch(r"(.+)-quickgelu", spelled, flags=re.IGNORECASE)
    if match:
        spelled, quick_gelu = match.group(1), True
    spelled = _ALIASES.get(spelled, spelled)
    by_lower = {preset.lower(): preset for preset in PRESETS}
    if spelled.lower() not in by_lower:
        raise ValueError(f"unknown model name {name!r}; known presets: {', '.join(list_models())}")
    return by_lower[spelled.lower()], quick_gelu


def get_config(name: str, *, quick_gelu: bool | None = None) -> CLIPConfig:
    """The preset config for `name`, or the config in a JSON file (`name` ending in .json: a
    CLIPConfig dict, or a checkpoint's config.json); `quick_gelu` overrides what the name implies."""
    if isinstance(name, str) and name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no model config file at {name}")
        data = json.loads(path.read_text())
        config = CLIPConfig.from_dict(data.get("model", data))
        return config if quick_gelu is None else config.replace(quick_gelu=quick_gelu)
    preset, suffix_quick_gelu = canonical_name(name)
    quick = suffix_quick_gelu if quick_gelu is None else quick_gelu
    return PRESETS[preset].replace(name=preset + ("-quickgelu" if quick else ""), quick_gelu=quick)


def list_models() -> list[str]:
    return list(PRESETS)
