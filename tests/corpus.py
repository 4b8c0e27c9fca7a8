"""Test inputs for the preprocess stage: clean pairs in every format, and a corpus of bad input."""

from __future__ import annotations

import base64
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image


def photo(width: int = 96, height: int = 80, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB")
    return image if mode == "RGB" else image.convert(mode)


def encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_header_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A tiny PNG whose header claims width x height pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
            + chunk(b"IEND", b""))


def sixteen_bit_png() -> bytes:
    values = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    return encode(Image.fromarray(values), "PNG")


def palette_alpha_png() -> bytes:
    image = photo(64, 64, seed=5).convert("P")
    image.info["transparency"] = 0
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [photo(64, 64, seed=s).convert("P") for s in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def clean_pairs(count: int, seed: int = 0) -> list[tuple[str, bytes, str]]:
    return [(f"pair{seed}-{i:04d}", encode(photo(96, 80, seed=seed * 1000 + i)), f"a photo number {i} of set {seed}")
            for i in range(count)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


# key → (members, expected reason or None when kept)
def bad_corpus() -> dict[str, tuple[dict[str, bytes], str | None]]:
    good_jpeg = encode(photo(120, 90, seed=42))
    corrupt = b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4
    truncated = encode(photo(128, 128, seed=7), "PNG")
    return {
        "ok-jpeg": ({"jpg": good_jpeg, "txt": b"a good photo", "json": json.dumps({"url": "x"}).encode()}, None),
        "corrupt-jpeg": ({"jpg": corrupt, "txt": b"corrupt"}, "undecodable_image"),
        "truncated-png": ({"png": truncated[: len(truncated) // 2], "txt": b"truncated"}, "undecodable_image"),
        "zero-bytes": ({"jpg": b"", "txt": b"empty file"}, "empty_image"),
        "sixteen-bit": ({"png": sixteen_bit_png(), "txt": b"a 16-bit png"}, None),
        "cmyk": ({"jpg": encode(photo(80, 80, seed=9).convert("CMYK")), "txt": b"a cmyk jpeg"}, None),
        "palette-alpha": ({"png": palette_alpha_png(), "txt": b"a palette png with alpha"}, None),
        "animated": ({"gif": animated_gif(), "txt": b"an animated gif"}, None),
        "bomb": ({"png": png_header_bomb(), "txt": b"a decompression bomb"}, "image_too_large"),
        "one-pixel": ({"png": encode(Image.new("RGB", (1, 1)), "PNG"), "txt": b"tiny"}, "image_too_small"),
        "bad-utf8": ({"jpg": encode(photo(70, 70, seed=11)), "txt": b"caf\xe9 \xff\xfe"}, "caption_not_utf8"),
        "long-caption": ({"jpg": encode(photo(70, 70, seed=12)), "txt": b"word " * 2000}, "caption_too_long"),
        "empty-caption": ({"jpg": encode(photo(70, 70, seed=13)), "txt": b"   \n"}, "empty_caption"),
        "panorama": ({"jpg": encode(photo(400, 40, seed=14)), "txt": b"very wide"}, "extreme_aspect_ratio"),
        "duplicate": ({"jpg": good_jpeg, "txt": b"a  good photo\n"}, "duplicate"),  # ok-jpeg's pair once cleaned
        "another-caption": ({"jpg": good_jpeg, "txt": b"the same photo, another caption"}, None),  # another pair
        "no-caption": ({"jpg": encode(photo(70, 70, seed=15))}, "missing_caption"),
        "no-image": ({"txt": b"a caption without its image"}, "missing_image"),
        "short-caption": ({"jpg": encode(photo(70, 70, seed=16)), "txt": b"ok"}, "caption_too_short"),  # < 3 chars
        "fuzzed-tiff": ({"tif": base64.b64decode(FUZZED_TIFF), "txt": b"pillow raises OverflowError"},
                        "undecodable_image"),
        "bad-exif": ({"jpg": corrupt_exif_jpeg(), "txt": b"an ASCII value where a number belongs"}, None),
        # a member name with a byte that is not UTF-8 (tarfile reads it as a surrogate escape)
        "caf\udce9": ({"jpg": encode(photo(70, 70, seed=17)), "txt": b"a latin-1 file name"}, None),
    }


# 150 bytes of TIFF found by fuzzing: Pillow's decoder raises OverflowError on it, not an OSError
FUZZED_TIFF = ("SUkqAAgAAAAKAAABBAABAAAAKAAAAAEBBAABAAAAJAAAAAIBAwADAAAAhgAAAAMBAwABAAAAAQAAAAYBAwABAAAAAgAAABEBEAABA"
               "AAAjAAAABUBAwABAAAAAwAAABYBBAD/////JAAAANYBBAABAAAA4BAAABwBAwABAAAAAQAAAAAAAAAIAAgACABegcHYzhoOoiDW")


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF holds an orientation and an ASCII value where a number belongs."""
    entries = [struct.pack(">HHII", 0x0112, 3, 1, 6 << 16), struct.pack(">HHI4s", 0x0128, 2, 4, b"des\0")]
    exif = b"Exif\x00\x00MM\x00*" + struct.pack(">IH", 8, len(entries)) + b"".join(entries) + bytes(4)
    buffer = io.BytesIO()
    photo(64, 48, seed=18).save(buffer, format="JPEG", exif=exif)
    return buffer.getvalue()


def write_bad_webdataset(directory: Path) -> dict[str, str | None]:
    """Two shards of the bad corpus plus one unreadable shard; returns key (`shard-00000.tar:ok-jpeg`) →
    expected reason."""
    directory.mkdir(parents=True, exist_ok=True)
    corpus = bad_corpus()
    items = list(corpus.items())
    halves = [items[: len(items) // 2], items[len(items) // 2 :]]
    for index, half in enumerate(halves):
        members = [(f"{key}.{ext}", data) for key, (files, _) in half for ext, data in files.items()]
        write_tar(directory / f"shard-{index:05d}.tar", members)
    (directory / "shard-00002.tar").write_bytes(b"this is not a tar archive at all" * 20)
    expected = {f"shard-{index:05d}.tar:" + key.encode("utf-8", "surrogateescape").decode("utf-8", "replace"): reason
                for index, half in enumerate(halves) for key, (_, reason) in half}  # keys are printable
    expected["shard-00002.tar#unreadable"] = "unreadable_source"
    return expected


def write_webdataset(directory: Path, pairs, shards: int = 2, labels=None) -> None:
    """img2dataset's layout; with `labels`, a `<key>.cls` member per sample."""
    directory.mkdir(parents=True, exist_ok=True)
    per = -(-len(pairs) // shards)
    for index in range(shards):
        members = []
        for i in range(index * per, min((index + 1) * per, len(pairs))):
            key, image, caption = pairs[i]
            members += [(f"{key}.jpg", image), (f"{key}.txt", caption.encode())]
            if labels is not None:
                members.append((f"{key}.cls", labels[i].encode()))
        write_tar(directory / f"shard-{index:05d}.tar", members)


def write_parquet(path: Path, pairs, labels=None, image_column="jpg", caption_column="txt") -> None:
    columns = {"key": [p[0] for p in pairs], image_column: [p[1] for p in pairs], caption_column: [p[2] for p in pairs]}
    if labels is not None:
        columns["label"] = labels
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)


def write_csv(directory: Path, pairs, delimiter: str = ",", labels=None) -> Path:
    """OpenCLIP's layout (`filepath`, `title`); with `labels`, a `label` column."""
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    lines = [delimiter.join(["filepath", "title", *(["label"] if labels is not None else [])])]
    for i, (key, image, caption) in enumerate(pairs):
        (images / f"{key}.jpg").write_bytes(image)
        lines.append(delimiter.join([f"images/{key}.jpg", caption, *([labels[i]] if labels is not None else [])]))
    path = directory / ("pairs.tsv" if delimiter == "\t" else "pairs.csv")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_folder(directory: Path, pairs, labels=None) -> None:
    """Images with sidecar `.txt` captions; with `labels`, sidecar `.cls` labels."""
    directory.mkdir(parents=True, exist_ok=True)
    for i, (key, image, caption) in enumerate(pairs):
        (directory / f"{key}.jpg").write_bytes(image)
        (directory / f"{key}.txt").write_text(caption)
        if labels is not None:
            (directory / f"{key}.cls").write_text(labels[i])
