"""The built-in synthetic dataset: procedural images of coloured shapes with compositional captions.

Every image shows one shape of one colour, size and position on a plain background, and its
caption says so in one of several phrasings ("a small red triangle on a grey background, top
left"). The class of an image is its "<colour> <shape>". A fixed set of colour-shape
combinations is held out: no training image shows them, although every colour and every shape
appears in training with other partners. Zero-shot accuracy on the held-out classes therefore
measures whether the model composes what it learned, not whether it memorised pairs.

Deterministic: sample i of a split with a given seed is always the same image and caption.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 38, 38), "green": (34, 160, 56), "blue": (40, 80, 225), "yellow": (240, 210, 30),
    "purple": (130, 50, 190), "orange": (245, 135, 20), "pink": (245, 120, 190), "cyan": (30, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross", "hexagon", "ring")
SIZES = {"small": 0.22, "large": 0.4}
POSITIONS = {"top left": (0.27, 0.27), "top right": (0.73, 0.27), "center": (0.5, 0.5),
             "bottom left": (0.27, 0.73), "bottom right": (0.73, 0.73)}
BACKGROUNDS = {"grey": (128, 128, 128), "white": (245, 245, 245), "black": (15, 15, 15)}
SPLITS = ("train", "heldout", "all")


def class_names() -> list[str]:
    """Every "<colour> <shape>" class, in label order."""
    return [f"{color} {shape}" for color in COLORS for shape in SHAPES]


def heldout_class_names() -> list[str]:
    """Two shapes per colour (and so two colours per shape) that training never shows."""
    colors = list(COLORS)
    return [f"{color} {SHAPES[(i + offset) % len(SHAPES)]}" for i, color in enumerate(colors) for offset in (0, 3)]


def train_class_names() -> list[str]:
    held = set(heldout_class_names())
    return [name for name in class_names() if name not in held]


@dataclass(frozen=True)
class Sample:
    key: str
    image: Image.Image
    caption: str
    label: int  # index into class_names()
    classname: str

    def image_bytes(self, format: str = "PNG") -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format=format)
        return buffer.getvalue()


def _caption(rng: random.Random, size: str, color: str, shape: str, position: str, background: str) -> str:
    phrasings = (
        f"a {size} {color} {shape} on a {background} background, {position}",
        f"a {color} {shape}",
        f"a {size} {color} {shape} in the {position}",
        f"a picture of a {color} {shape} on {background}",
        f"{position}: a {size} {color} {shape}",
        f"a {color} {shape} drawn on a {background} background",
    )
    return rng.choice(phrasings)


def _polygon(cx: float, cy: float, radius: float, corners: int, rotation: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.cos(rotation + 2 * math.pi * k / corners),
             cy + radius * math.sin(rotation + 2 * math.pi * k / corners)) for k in range(corners)]


def render(shape: str, color: str, size: str, position: str, background: str, image_size: int,
           rng: random.Random) -> Image.Image:
    """Draw at 4x and downsample, for smooth edges; small jitter in colour, place and scale."""
    scale = 4
    canvas = image_size * scale
    bg = tuple(min(255, max(0, c + rng.randint(-12, 12))) for c in BACKGROUNDS[background])
    image = Image.new("RGB", (canvas, canvas), bg)
    draw = ImageDraw.Draw(image)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLORS[color])
    fx, fy = POSITIONS[position]
    cx = (fx + rng.uniform(-0.05, 0.05)) * canvas
    cy = (fy + rng.uniform(-0.05, 0.05)) * canvas
    r = SIZES[size] * canvas / 2 * rng.uniform(0.85, 1.15)
    rotation = rng.uniform(-0.2, 0.2)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(1, int(r * 0.35)))
    elif shape == "square":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rotation), fill=fill)
    elif shape == "diamond":
        draw.polygon(_polygon(cx, cy, r * 1.2, 4, rotation), fill=fill)
    elif shape == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, -math.pi / 2 + rotation), fill=fill)
    elif shape == "hexagon":
        draw.polygon(_polygon(cx, cy, r * 1.1, 6, rotation), fill=fill)
    elif shape == "star":
        outer = _polygon(cx, cy, r * 1.25, 5, -math.pi / 2 + rotation)
        inner = _polygon(cx, cy, r * 0.5, 5, -math.pi / 2 + math.pi / 5 + rotation)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=fill)
    elif shape == "cross":
        arm = r * 0.38
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    return image.resize((image_size, image_size), Image.Resampling.LANCZOS)


def split_class_names(split: str) -> list[str]:
    """The classes `split` draws from: "train" the seen combinations, "heldout" the unseen ones,
    "all" every combination."""
    if split not in SPLITS:
        raise ValueError(f"unknown synthetic split {split!r}; choose one of {SPLITS}")
    return {"train": train_class_names, "heldout": heldout_class_names, "all": class_names}[split]()


def samples(count: int, *, split: str = "train", seed: int = 0, image_size: int = 64,
            start: int = 0) -> Iterator[Sample]:
    """`count` samples of `split` (see `split_class_names`), from index `start`."""
    if count < 0 or start < 0:
        raise ValueError("count and start must be non-negative")
    names = split_class_names(split)
    label_of = {name: i for i, name in enumerate(class_names())}
    for index in range(start, start + count):
        rng = random.Random(f"{seed}/{split}/{index}")
        classname = rng.choice(names)
        color, shape = classname.split(" ")
        size, position, background = rng.choice(list(SIZES)), rng.choice(list(POSITIONS)), rng.choice(list(BACKGROUNDS))
        image = render(shape, color, size, position, background, image_size, rng)
        yield Sample(key=f"synthetic-{split}-{seed}-{index:08d}", image=image,
                     caption=_caption(rng, size, color, shape, position, background),
                     label=label_of[classname], classname=classname)
