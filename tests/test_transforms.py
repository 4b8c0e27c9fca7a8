import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T  # the reference only: clip_core itself never imports torchvision

import clip_core
import corpus
from clip_core.transforms import OPENAI_MEAN, OPENAI_STD, ImageError, decode_image, open_image, peek_image, to_rgb


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([np.sin(x / 17.0 + c) * np.cos(y / 11.0 - c) for c in range(3)], axis=-1) * 100 + 128
    noise = rng.normal(0, 20, size=(height, width, 3))
    return Image.fromarray(np.clip(smooth + noise, 0, 255).astype(np.uint8), "RGB")


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (1000, 231), (100, 90)])
def test_eval_transform_matches_openai_preprocessing(size):
    image = _photo(*size)
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor()])
    expected = reference(image)
    ours = clip_core.image_transform(224)(image)
    unnormalized = ours * torch.tensor(OPENAI_STD).view(3, 1, 1) + torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert (unnormalized - expected).abs().max() <= 1 / 255 + 1e-6


def test_normalization_uses_clip_mean_and_std():
    grey = Image.new("RGB", (64, 64), (255, 0, 128))
    out = clip_core.image_transform(32)(grey)
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
    torch.testing.assert_close(out[:, 5, 5], expected)


def test_train_transform_crops_randomly_but_reproducibly():
    image = _photo(320, 240)
    a = clip_core.image_transform(64, train=True, seed=1)
    b = clip_core.image_transform(64, train=True, seed=1)
    first, second = a(image), a(image)
    assert first.shape == (3, 64, 64)
    assert not torch.equal(first, second), "two draws of the random crop should differ"
    torch.testing.assert_close(b(image), first)


def test_inputs_of_every_mode_become_rgb():
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red → white
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (8, 8), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)
    assert to_rgb(Image.new("L", (4, 4), 200)).getpixel((0, 0)) == (200, 200, 200)
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 255] * 256)
    assert to_rgb(palette).getpixel((0, 0)) == (0, 0, 255)
    with_transparency = palette.copy()
    with_transparency.info["transparency"] = 0
    assert to_rgb(with_transparency).getpixel((0, 0)) == (255, 255, 255)
    # a PNG's tRNS colour in a grey or RGB image (PNG optimisers write binary alpha so): that colour is
    # transparent, over white as the alpha modes are; the others keep theirs
    for mode, clear, kept in (("L", 0, 90), ("RGB", (0, 0, 0), (90, 90, 90))):
        image = Image.new(mode, (4, 4), clear)
        image.putpixel((1, 1), kept)
        saved = io.BytesIO()
        image.save(saved, "PNG", transparency=clear)
        rgb = to_rgb(Image.open(io.BytesIO(saved.getvalue())))
        assert (rgb.getpixel((0, 0)), rgb.getpixel((1, 1))) == ((255, 255, 255), (90, 90, 90)), mode


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert open_image(buffer.getvalue()).size == (20, 40)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def test_a_large_jpeg_decodes_at_the_smallest_scale_that_still_covers_the_size():
    photo = _photo(1600, 1200)
    jpeg = _encoded(photo, "JPEG")
    reduced = open_image(jpeg, reduce_to=224)
    assert reduced.size == (400, 300)  # 1/4 scale: 1/8 (200x150) would not cover 224
    crop = clip_core.image_transform(224).crop
    difference = np.abs(np.asarray(crop(reduced), np.int16) - np.asarray(crop(open_image(jpeg)), np.int16))
    assert difference.mean() < 2 and np.percentile(difference, 99) <= 8, "the reduced decode looks different"
    assert open_image(_encoded(photo, "PNG"), reduce_to=224).size == (1600, 1200)  # not a JPEG: in full
    assert open_image(_encoded(_photo(440, 330), "JPEG"), reduce_to=224).size == (440, 330)  # under 2x: in full


def test_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (5000, 5000)).save(buffer, format="PNG")  # small file, 25 MP
    with pytest.raises(ImageError, match="over the limit of 1,000,000") as info:
        clip_core.image_transform(64, max_pixels=1_000_000)(buffer.getvalue())
    assert info.value.reason == "too_large"
    # a thin strip passes the pixel limit, but its resize to 64 px high would not (64 x 64 x 300,000)
    strip = io.BytesIO()
    Image.new("L", (300_000, 1)).save(strip, format="PNG")
    with pytest.raises(ImageError, match=r"300000x1: resizing .* makes 1,228,800,000 pixels, over .*crop it") as info:
        clip_core.image_transform(64)(strip.getvalue())
    assert info.value.reason == "too_large"
    assert clip_core.image_transform(64)(Image.new("RGB", (640, 64))).shape == (3, 64, 64)  # 10:1 is fine


def test_broken_images_raise_clear_errors():
    with pytest.raises(ImageError, match="empty") as info:
        open_image(b"")
    assert info.value.reason == "empty"
    with pytest.raises(ImageError, match="could not be decoded") as info:
        open_image(b"definitely not an image")
    assert info.value.reason == "unsupported"
    buffer = io.BytesIO()
    _photo(256, 256).save(buffer, format="JPEG")
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        open_image(buffer.getvalue()[: buffer.tell() // 2])
    assert info.value.reason == "undecodable"


def test_whatever_pillow_raises_on_a_hostile_file_is_an_image_error():
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        open_image(base64.b64decode(corpus.FUZZED_TIFF))
    assert info.value.reason == "undecodable"
    # a format Pillow reads but we do not (PPM here; DDS, EPS, SPIDER...): never handed to its decoder
    with pytest.raises(ImageError, match="could not be decoded") as info:
        open_image(_encoded(_photo(64, 48), "PPM"))
    assert info.value.reason == "unsupported"
    # corrupt EXIF (an ASCII value where a number belongs): the pixels decode, upright as stored
    assert open_image(corpus.corrupt_exif_jpeg()).size == (64, 48)


def test_sixteen_bit_images_scale_to_eight_bits():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    assert np.asarray(to_rgb(Image.fromarray(values)))[0, :, 0].tolist() == [0, 1, 128, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 255.0, 100.4]], np.float32))))[0, :, 0].tolist() \
        == [0, 255, 100]


def test_peeking_reads_the_header_alone_and_decoding_finishes_the_job():
    buffer = io.BytesIO()
    _photo(256, 192).save(buffer, format="JPEG")
    truncated = buffer.getvalue()[: buffer.tell() // 2]
    peeked = peek_image(truncated)  # the size is in the header: a caller can check the shape first
    assert peeked.size == (256, 192)
    with pytest.raises(ImageError, match="truncated or corrupt") as info:
        decode_image(peeked)
    assert info.value.reason == "undecodable"
    bomb = io.BytesIO()
    Image.new("L", (5000, 5000)).save(bomb, format="PNG")
    with pytest.raises(ImageError, match="over the limit") as info:
        peek_image(bomb.getvalue(), max_pixels=1_000_000)
    assert info.value.reason == "too_large"
    decoded = decode_image(peek_image(buffer.getvalue()), reduce_to=64)
    assert decoded.mode == "RGB" and decoded.size == (128, 96)  # 1/2 scale covers 64


def test_invalid_transform_settings_are_rejected():
    with pytest.raises(ValueError, match="image_size must be a positive int"):
        clip_core.image_transform(0)
    with pytest.raises(ValueError, match="scale must satisfy"):
        clip_core.image_transform(64, train=True, scale=(0.5, 1.5))


def test_an_image_error_survives_pickling_with_its_reason():
    """Raised in a Ray task (decoding a prepared shard), it is pickled on its way to the driver."""
    import pickle

    error = pickle.loads(pickle.dumps(ImageError("the image <bytes> is 5000x5000", "too_large")))
    assert type(error) is ImageError and str(error) == "the image <bytes> is 5000x5000" and error.reason == "too_large"
