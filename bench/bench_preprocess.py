"""Preprocess throughput: our decode+resize+encode path vs a naive Pillow baseline, per core,
and the end-to-end Ray Data pipeline on this machine's cores.

Inputs are LAION-like JPEGs (500x375 to 1600x1200, quality 90, photo-like content). Both paths
produce a center-cropped JPEG (quality 95) at the target size; ours also validates the image and
hashes its pixels for deduplication. Writes bench/results/preprocess.md and preprocess.png.

    python bench/bench_preprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import markdown_table, time_side_by_side, write_report  # noqa: E402
from clip_core.transforms import center_crop, resize_shortest_side  # noqa: E402
from workflows.preprocess import PreprocessOptions, prepare_image, preprocess  # noqa: E402

SIZES = [(500, 375), (640, 480), (800, 600), (1024, 768), (1280, 960), (1600, 1200)]


def laion_like_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth gradients, overlapping shapes, blur and sensor noise."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        width, height = rng.choice(SIZES)
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        base = np.stack([128 + 100 * np.sin(x / rng.uniform(40, 200) + c + i) * np.cos(y / rng.uniform(40, 200) - c)
                         for c in range(3)], axis=-1)
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = rng.randrange(width), rng.randrange(height)
            box = (x0, y0, x0 + rng.randrange(20, width // 2), y0 + rng.randrange(20, height // 2))
            draw.ellipse(box, fill=tuple(rng.randrange(256) for _ in range(3)))
        image = image.filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(image, dtype=np.float32) + np.random.default_rng(i).normal(0, 6, (height, width, 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def mirrored_variants(images: list[bytes]) -> list[bytes]:
    """Each image as is, mirrored, flipped and turned: distinct pixels at a fraction of the generator's cost."""
    out = list(images)
    for method in (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180):
        for data in images:
            buffer = io.BytesIO()
            Image.open(io.BytesIO(data)).transpose(method).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
    return out


def naive(data: bytes, size: int) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    image = center_crop(resize_shortest_side(image, size), size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def dedupe_bytes_per_row(rows: int = 200_000) -> float:
    """Memory the one deduplication actor holds per distinct row it has seen (Python heap, tracemalloc)."""
    import hashlib
    import tracemalloc

    import pyarrow as pa

    from workflows.preprocess_actors import Deduplicate

    keys = [f"{i // 10_000:05d}.tar:{i:09d}" for i in range(rows)]  # img2dataset's key width, 10,000 rows a shard
    sources = [f"s3://laion-bucket/shards/{i // 10_000:05d}.tar" for i in range(rows)]
    hashes = [hashlib.sha256(key.encode()).hexdigest()[:32] for key in keys]
    captions = [f"a photo number {i} of a laion-like caption" for i in range(rows)]
    table = pa.table({"source": sources, "position": [i % 10_000 for i in range(rows)], "key": keys,
                      "pixel_hash": hashes, "caption": captions,
                      "reason": pa.nulls(rows, pa.string()), "detail": pa.nulls(rows, pa.string())})
    deduplicate = Deduplicate()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for offset in range(0, rows, 10_000):
        deduplicate(table.slice(offset, 10_000))
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    count = 60 if args.quick else 300
    images = laion_like_jpegs(count)
    megapixels = sum(Image.open(io.BytesIO(d)).size[0] * Image.open(io.BytesIO(d)).size[1] for d in images) / 1e6
    options = PreprocessOptions(image_size=args.image_size)

    seconds = time_side_by_side({
        "ours": lambda: [prepare_image(d, options) for d in images],
        "naive": lambda: [naive(d, args.image_size) for d in images],
    }, repeats=2 if args.quick else 3)
    ours_rate, naive_rate = count / seconds["ours"], count / seconds["naive"]
    print(f"per core: ours {ours_rate:.1f} rows/s, naive {naive_rate:.1f} rows/s", flush=True)

    # end to end through Ray Data: WebDataset shards → prepared dataset, all cores
    import tarfile

    from workflows.runtime import init_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    init_ray()
    pipeline_images = mirrored_variants(images)  # 4x the rows, all distinct: Ray's fixed costs amortise
    with tempfile.TemporaryDirectory() as tmp:
        shards, tars = 8, Path(tmp) / "tars"
        tars.mkdir()
        for s in range(shards):
            with tarfile.open(tars / f"shard-{s:05d}.tar", "w") as archive:
                for i in range(s, len(pipeline_images), shards):
                    for name, payload in ((f"{i:06d}.jpg", pipeline_images[i]),
                                          (f"{i:06d}.txt", f"photo {i}".encode())):
                        info = tarfile.TarInfo(name)
                        info.size = len(payload)
                        archive.addfile(info, io.BytesIO(payload))
        one_file = Path(tmp) / "pairs.parquet"  # the same rows as one file, as a single CSV or Parquet source is
        # in row groups of 256 rows (~55 MiB; Hugging Face writes image sets in 100s): one group of them all
        # (~260 MiB) is past what preprocess reads at once
        pq.write_table(pa.table({"key": [f"{i:06d}" for i in range(len(pipeline_images))], "jpg": pipeline_images,
                                 "txt": [f"photo {i}" for i in range(len(pipeline_images))]}), one_file,
                       row_group_size=256)
        variants = {  # name: (source, options)
            f"{shards} tar shards": (tars, options),
            f"{shards} tar shards, rows written in source order (`shuffle: false`)":
                (tars, options.model_copy(update={"shuffle": False})),
            "1 Parquet file": (one_file, options.model_copy(update={"image_key": "jpg", "caption_key": "txt"})),
        }
        preprocess(str(tars), str(Path(tmp) / "warmup"), options.model_copy(update={"image_size": 32}),
                   echo=lambda *_: None)
        pipeline_seconds = {name: [] for name in variants}
        runs = 1 if args.quick else 3
        for run in range(runs):
            for index, (name, (source, variant)) in enumerate(variants.items()):  # interleaved: drift hits all alike
                started = time.perf_counter()
                manifest = preprocess(str(source), str(Path(tmp) / f"out-{run}-{index}"), variant, echo=lambda *_: None)
                pipeline_seconds[name].append(time.perf_counter() - started)
                assert manifest["counts"]["kept"] == len(pipeline_images), manifest["counts"]  # all distinct, all kept
    pipeline_rates = {name: len(pipeline_images) / statistics.median(seconds)
                      for name, seconds in pipeline_seconds.items()}
    cores = os.cpu_count()
    for name, rate in pipeline_rates.items():
        print(f"pipeline on {cores} cores, {name}: {rate:.1f} rows/s", flush=True)

    dedupe_bytes = dedupe_bytes_per_row(20_000 if args.quick else 200_000)
    print(f"deduplication holds {dedupe_bytes:.0f} bytes per distinct row", flush=True)

    rows = [
        ["decode+resize+encode, 1 core", f"{ours_rate:.1f}", f"{naive_rate:.1f}", f"**{ours_rate / naive_rate:.2f}x**"],
        *([f"Ray Data pipeline, {cores} cores, {name} → shards", f"{rate:.1f}", "", ""]
          for name, rate in pipeline_rates.items()),
    ]
    notes = [
        f"{count} JPEGs, {megapixels / count:.2f} megapixels on average (500x375 to 1600x1200, quality 90), to "
        f"{args.image_size}x{args.image_size} JPEG quality 95. Rows per second; ratio above 1 means ours is faster.",
        "Naive: `Image.open().convert('RGB')`, bicubic resize of the shortest side, center crop, encode. Ours: the "
        "same geometry after Pillow's `draft()` reduced-scale JPEG decoding, plus validation (size, aspect, bomb "
        "limits) and a pixel hash for deduplication.",
        f"The pipeline rows (median of {runs} runs each, interleaved) take {len(pipeline_images)} rows (the JPEGs "
        f"above, mirrored, flipped and turned) in {shards} tar shards, or in one Parquet file, through the whole "
        "stage: reading, tokenizing captions, deduplication, writing shards and the "
        "manifest, next to Ray's own processes on the same cores; by default the kept rows pass Ray Data's "
        "`random_shuffle` before the shards are written (an all-to-all exchange through the object store).",
        "Without the shuffle the stage is one streaming pipeline, and Ray Data reserves each stage's minimum "
        "CPUs even while it waits for rows: the exact-size repartition (1 CPU) and the shard writer (0.5) hold "
        "1.5 of the 4 logical CPUs a 2-core local Ray has, so processing runs about one task at a time instead of "
        "two to three (Ray Data's log: a process_batch budget of 0.6 CPU). "
        "Behind the shuffle's barrier they hold nothing "
        "until it is done. On a cluster node's 32 or more CPUs the reservation is under 5%.",
        f"Exact deduplication keeps the first occurrence in source order, so one actor sees every row: it holds "
        f"{dedupe_bytes:.0f} bytes per distinct row (tracemalloc), {dedupe_bytes * 1e8 / 2**30:.1f} GiB per "
        "100M rows.",
        "",
        markdown_table(["measurement", "ours rows/s", "naive rows/s", "ratio"], rows),
    ]
    path = write_report("preprocess", "Preprocess: decode + resize + encode", notes,
                        {"decode+resize+encode (1 core)": {"vs naive Pillow": ours_rate / naive_rate}},
                        bar_label="speed-up vs naive (x)")
    print(path.read_text())


if __name__ == "__main__":
    main()
