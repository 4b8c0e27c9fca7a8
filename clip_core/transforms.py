"""CLIP image preprocessing with Pillow and numpy (no torchvision).

eval: resize the shortest side to the model resolution (bicubic), center crop, normalize.
train: random resized crop (scale 0.9-1.0, as OpenCLIP) and the same normalization.
Any input mode is brought to RGB (transparency composited on white), EXIF orientation is
applied, and decompression bombs are refused before their pixels are decoded.
"""

from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
# IMAGE_FORMATS' readers, registered (Pillow registers a few at first use, the rest only on Image.init())
from PIL import BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin  # noqa: F401
from PIL import TiffImagePlugin, WebPImagePlugin  # noqa: F401

if TYPE_CHECKING:
    import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# 64 megapixels: far above any training resolution, far below what exhausts memory
DEFAULT_MAX_PIXELS = 64_000_000
# what Pillow may read an image as (JPEG's reader also takes a camera's MPO); its other decoders (DDS,
# EPS, SPIDER, ...) are rarely images anyone trains on and a larger surface for hostile files
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


class ImageError(ValueError):
    """An image that cannot be used: undecodable, truncated, empty or too large."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # pickled whole: raised in a Ray task, it reaches the driver as it was raised
        return type(self), (str(self), self.reason)


def open_image(source: bytes | str | os.PathLike | Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
               reduce_to: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB with EXIF orientation applied: `decode_image(peek_image(...))`.

    Raises ImageError (with `.reason` one of "empty", "too_large", "unsupported", "undecodable")
    naming the problem instead of Pillow's assorted exceptions.
    """
    image = source if isinstance(source, Image.Image) else peek_image(source, max_pixels=max_pixels)
    return decode_image(image, max_pixels=max_pixels, reduce_to=reduce_to)


def peek_image(source: bytes | str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open an image and check its pixel count from its header alone, decoding no pixels, so that a
    caller can check its shape too before paying for `decode_image`. Raises ImageError as `open_image`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError("the image is empty (0 bytes)", "empty")
        fp, name = io.BytesIO(source), "<bytes>"
    else:
        fp, name = source, os.fspath(source)
        if os.path.getsize(name) == 0:
            raise ImageError(f"the image {name} is empty (0 bytes)", "empty")
    try:
        image = Image.open(fp, formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"the image {name} is too large to decode safely: {exc}", "too_large") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"the image {name} could not be decoded: {exc}", "unsupported") from exc
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a hostile file reaches Pillow's odd corners (struct, Type, Overflow...)
        raise ImageError(f"the image {name} could not be decoded: {exc}", "undecodable") from exc
    _check_size(image, max_pixels, name)
    return image


def decode_image(image: Image.Image, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 reduce_to: int | None = None) -> Image.Image:
    """A peeked (or any) image decoded as RGB with EXIF orientation applied; with `reduce_to`, a JPEG
    is decoded at the smallest DCT scale that still covers that size (`reduce_decoding`)."""
    if reduce_to:
        reduce_decoding(image, reduce_to)
    name = getattr(image, "filename", "") or "<image>"
    try:
        image.load()
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - as in peek_image
        raise ImageError(f"the image {name} is truncated or corrupt: {exc}", "undecodable") from exc
    _check_size(image, max_pixels, name)
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001, S110 - corrupt EXIF: the pixels are fine, only their orientation is unknown
        pass
    return to_rgb(image)


def reduce_decoding(image: Image.Image, size: int) -> None:
    """Before `load()`: a JPEG whose shortest side is at least twice `size` decodes at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling, Pillow's `draft`), the smallest that still covers `size`: up to 64x
    fewer pixels to decode and then resize. Other formats decode in full."""
    width, height = image.size
    short = min(width, height)
    if image.format == "JPEG" and short >= 2 * size:
        image.draft("RGB", (-(-width * size // short), -(-height * size // short)))


def _check_size(image: Image.Image, max_pixels: int, name: str) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            f"the image {name} is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(a possible decompression bomb); downscale it or raise max_pixels",
            "too_large",
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: transparency over white (an alpha channel, or one colour a PNG's tRNS chunk
    marks transparent in a P, L or RGB image, as PNG optimisers write binary alpha), 16/32-bit scaled to
    8 bits, CMYK converted."""
    keyed = "transparency" in image.info
    if image.mode == "RGB" and not keyed:
        return image
    if image.mode in ("P", "L", "RGB"):
        image = image.convert("RGBA" if keyed else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.array(image, dtype=np.float32)  # a copy, worked in place: a 64-MP image is 256 MB of these
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        np.multiply(values, np.float32(255.0 / top), out=values)
        np.clip(values, 0, 255, out=values)
        image = Image.fromarray(np.rint(values, out=values).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def resize_shortest_side(image: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shortest side is `size` (the long side is truncated, as torchvision does)."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    if short == size:
        return image
    new_long = int(size * long / short)
    new_size = (size, new_long) if width <= height else (new_long, size)
    return image.resize(new_size, Image.Resampling.BICUBIC)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    if width < size or height < size:
        # pad with black like torchvision's CenterCrop when the image is smaller than the crop
        padded = Image.new(image.mode, (max(width, size), max(height, size)))
        padded.paste(image, ((padded.width - width) // 2, (padded.height - height) // 2))
        image, width, height = padded, padded.width, padded.height
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def random_crop_box(width: int, height: int, rng: random.Random, scale=(0.9, 1.0),
                    ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop sampling as (left, top, w, h): of up to ten draws of an area fraction
    in `scale` and a log-uniform aspect ratio, the first that fits; else a center crop at the clamped ratio."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(image: Image.Image, size: int, rng: random.Random, scale=(0.9, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> Image.Image:
    """A `random_crop_box` of the image, resized to size x size (bicubic)."""
    left, top, w, h = random_crop_box(*image.size, rng, scale, ratio)
    return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))


def to_tensor(image: Image.Image, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """RGB image → normalized FloatTensor [3, H, W]."""
    import torch  # in the functions that make tensors: the Pillow part runs without torch

    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return pixels.sub_(mean_t).div_(std_t)


def normalize(images: torch.Tensor, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """Images in [0, 1] [B, 3, H, W], or uint8 [B, H, W, 3] as decoders give them → normalized float [B, 3, H, W]."""
    import torch

    if images.dtype == torch.uint8:
        images = images.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean_t) / std_t


@dataclass(frozen=True)
class ImageTransform:
    """Callable preprocessing: an image (PIL, bytes or path) → FloatTensor [3, size, size]."""

    image_size: int
    train: bool = False
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    scale: tuple[float, float] = (0.9, 1.0)
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {self.image_size!r}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {self.scale}")
        object.__setattr__(self, "_rng", random.Random(self.seed))

    def crop(self, image: Image.Image) -> Image.Image:
        """The geometric part alone: RGB image → RGB image of image_size x image_size."""
        if self.train:
            return random_resized_crop(image, self.image_size, self._rng, scale=self.scale)
        width, height = image.size
        resized = self.image_size * self.image_size * max(width, height) // max(min(width, height), 1)
        if resized > self.max_pixels:  # a thin strip: few pixels in, but its resize would be huge
            raise ImageError(f"the image is {width}x{height}: resizing its short side to {self.image_size} makes "
                             f"{resized:,} pixels, over the limit of {self.max_pixels:,}; crop it first", "too_large")
        return center_crop(resize_shortest_side(image, self.image_size), self.image_size)

    def __call__(self, image) -> torch.Tensor:
        return to_tensor(self.crop(open_image(image, max_pixels=self.max_pixels)), self.mean, self.std)


def image_transform(image_size: int, train: bool = False, **options) -> ImageTransform:
    """CLIP's preprocessing for a model of resolution `image_size` (e.g. `model.config.vision.image_size`)."""
    return ImageTransform(image_size, train=train, **options)
