"""What the stages read that someone else may have written (a manifest, a shard in a shared bucket): a
crafted one is refused with an error naming it, and a valid one reads as before. Without Ray."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clip_core
from clip_core.transforms import ImageError, center_crop, resize_shortest_side, to_rgb
from workflows import registry, storage
from workflows.data_passes import train_record
from workflows.embed import FORMAT as EMBEDDINGS_FORMAT
from workflows.embed import read_embeddings
from workflows.evaluate import retrieval_png
from workflows.preprocess import decode_batch, prepared_max_pixels, read_prepared_table

from micro import micro_config


def _write_parquet(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys}), path)


def _prepared(directory: Path, paths: list) -> str:
    """A prepared dataset whose manifest lists `paths` as its shards (written by hand: only what a reader reads)."""
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"schema_version": 1, "counts": {"read": 1, "kept": 1, "rejected": 0, "rejected_by_reason": {}},
                "shards": [{"path": path, "rows": 1} for path in paths]}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def _embeddings(directory: Path, paths: list) -> str:
    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"format": EMBEDDINGS_FORMAT, "files": [{"path": path, "rows": 1} for path in paths]}
    (directory / "embeddings.json").write_text(json.dumps(manifest))
    return str(directory)


# files outside the dataset that a crafted manifest points at; each exists, so only the check stops the read
OUTSIDE = ["{tmp}/other-team/secret.parquet", "../other-team/secret.parquet", "shards/../../other-team/secret.parquet",
           "file://{tmp}/other-team/secret.parquet", "s3://other-bucket/secret.parquet", "shards//part.parquet",
           "./shards/part.parquet", "", 7]


@pytest.mark.parametrize("listed", OUTSIDE)
def test_a_prepared_manifest_listing_a_file_outside_its_dataset_is_refused(tmp_path, listed):
    _write_parquet(tmp_path / "other-team" / "secret.parquet", ["secret"])
    _write_parquet(tmp_path / "data" / "shards" / "part.parquet", ["ours"])
    listed = listed.format(tmp=tmp_path) if isinstance(listed, str) else listed
    data = _prepared(tmp_path / "data", ["shards/part.parquet", listed])
    with pytest.raises(ValueError, match="lists the file .* which is not a relative path inside") as error:
        read_prepared_table(data)
    assert f"{data}/manifest.json lists the file {listed!r}" in str(error.value)


@pytest.mark.parametrize("listed", OUTSIDE)
def test_an_embeddings_manifest_listing_a_file_outside_its_directory_is_refused(tmp_path, listed):
    _write_parquet(tmp_path / "other-team" / "secret.parquet", ["secret"])
    listed = listed.format(tmp=tmp_path) if isinstance(listed, str) else listed
    embeddings = _embeddings(tmp_path / "embeddings-out", [listed])
    with pytest.raises(ValueError, match="not a relative path inside") as error:
        read_embeddings(embeddings)
    assert f"{embeddings}/embeddings.json lists the file {listed!r}" in str(error.value)


def test_files_a_manifest_lists_inside_its_directory_are_read(tmp_path):
    _write_parquet(tmp_path / "data" / "shards" / "shard-a.parquet", ["a"])
    _write_parquet(tmp_path / "data" / "shards" / "shard-b.parquet", ["b", "c"])
    data = _prepared(tmp_path / "data", ["shards/shard-a.parquet", "shards/shard-b.parquet"])
    assert read_prepared_table(data)["key"].to_pylist() == ["a", "b", "c"]
    _write_parquet(tmp_path / "out" / "embeddings" / "0.parquet", ["x"])
    _, table = read_embeddings(_embeddings(tmp_path / "out", ["embeddings/0.parquet"]))
    assert table["key"].to_pylist() == ["x"]


# ------------------------------------------------------------------------- prepared images


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _pixels_before(data: bytes, image_size: int) -> np.ndarray:
    """A prepared image as decode_batch read it before (bare Image.open): the reference for valid images."""
    image = to_rgb(Image.open(io.BytesIO(data)))
    if image.size != (image_size, image_size):
        image = center_crop(resize_shortest_side(image, image_size), image_size)
    return np.asarray(image)


def test_decode_batch_reads_valid_prepared_images_as_before():
    pictures = [_picture(64, 64, seed) for seed in range(3)]
    images = [_encoded(pictures[0], "PNG"), _encoded(pictures[1], "JPEG", quality=95),
              _encoded(pictures[2], "WEBP", lossless=True),
              _encoded(_picture(96, 80, 3), "JPEG"),  # prepared at another size: resized and cropped as before
              _encoded(_picture(48, 48, 4).convert("L"), "PNG")]
    batch = {"key": np.asarray([f"k{i}" for i in range(len(images))], dtype=object),
             "image": np.asarray(images, dtype=object),
             "tokens": [[49406, 320, 49407], [49406, 49407], list(range(100)), [1], []],
             "label": np.asarray([0, np.nan, 2, 3, np.nan])}
    now = decode_batch(batch, 64)
    assert now["image"].dtype == np.uint8
    assert np.array_equal(now["image"], np.stack([_pixels_before(data, 64) for data in images]))
    assert now["label"].tolist() == [0, -1, 2, 3, -1] and now["tokens"][2].tolist() == list(range(77))
    assert np.array_equal(now["image"][0], np.asarray(pictures[0]))  # PNG and lossless WebP: the pixels stored
    assert np.array_equal(now["image"][2], np.asarray(pictures[2]))


def test_decode_batch_refuses_a_prepared_image_of_another_format_naming_its_row():
    batch = {"key": ["good", "odd"], "image": [_encoded(_picture(64, 64), "PNG"), _encoded(_picture(64, 64), "GIF")],
             "tokens": [[1], [2]]}
    with pytest.raises(ImageError, match="prepared image of row key 'odd': the image is GIF, not one of the formats "
                                         "preprocess writes \\(JPEG, PNG, WEBP\\)"):
        decode_batch(batch, 64)
    batch["image"][1] = _encoded(_picture(64, 64), "TGA")  # not even among the formats clip_core opens
    with pytest.raises(ImageError, match="prepared image of row key 'odd': the image <bytes> could not be decoded"):
        decode_batch(batch, 64)
    del batch["key"]
    with pytest.raises(ImageError, match="prepared image of row 1 of a batch without keys"):
        decode_batch(batch, 64)


def test_decode_batch_refuses_a_prepared_image_larger_than_preprocess_writes():
    """A 5000 x 5000 PNG (25 MB of bytes decoded from 25 kB): under Pillow's own bomb limit, which the bare
    Image.open relied on, and over the largest image preprocess writes (4096 x 4096)."""
    bomb = _encoded(Image.new("L", (5000, 5000)), "PNG")
    assert len(bomb) < 100_000
    batch = {"key": ["bomb"], "image": [bomb], "tokens": [[1]]}
    with pytest.raises(ImageError, match="prepared image of row key 'bomb': the image <bytes> is 5000x5000 = "
                                         "25,000,000 pixels, over the limit of 16,777,216") as error:
        decode_batch(batch, 224)
    assert error.value.reason == "too_large"
    assert prepared_max_pixels(224) == 4096**2 and prepared_max_pixels(3000) == 4 * 3000**2


def _prepared_images(directory: Path, images: dict[str, bytes]) -> str:
    table = pa.table({"key": list(images), "image": list(images.values()),
                             "caption": [f"a picture called {key}" for key in images]})
    (directory / "shards").mkdir(parents=True)
    pq.write_table(table, directory / "shards" / "shard-0.parquet")
    return _prepared(directory, ["shards/shard-0.parquet"])


def test_the_retrieval_figure_draws_prepared_images_through_the_checked_opener(tmp_path):
    images = {f"k{i}": _encoded(_picture(32, 32, i), "PNG") for i in range(3)}
    features = np.eye(3, dtype=np.float32)
    ordered = {"key": np.asarray(list(images)), "image_id": np.asarray(list(images)), "image_features": features,
               "text_features": features}
    retrieval_png(_prepared_images(tmp_path / "good", images), ordered, str(tmp_path / "good.png"), queries=2, top=2)
    assert Image.open(tmp_path / "good.png").format == "PNG"
    images["k1"] = _encoded(_picture(32, 32), "GIF")
    data = _prepared_images(tmp_path / "odd", images)
    with pytest.raises(ImageError, match=f"the image of key 'k1' in {data}: the image is GIF"):
        retrieval_png(data, ordered, str(tmp_path / "odd.png"), queries=2, top=2)


# ------------------------------------------------------------------------- checkpoints and model versions


def test_a_checkpoint_config_over_a_mebibyte_is_refused_unread(tmp_path):
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "ckpt")
    description = registry.checkpoint_description(str(tmp_path / "ckpt"))
    assert description["model"]["name"] == "micro"
    train = {"step": 7, "data_pass": 2}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**description, "train": train}))
    assert train_record(str(tmp_path / "ckpt")) == train
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**description, "padding": "x" * 2**20}))
    with pytest.raises(storage.TooLarge, match="config.json is larger than the limit of 1,048,576 bytes"):
        registry.checkpoint_description(str(tmp_path / "ckpt"))
    with pytest.raises(storage.TooLarge, match="config.json is larger than the limit of 1,048,576 bytes"):
        train_record(str(tmp_path / "ckpt"))  # read on resume, perhaps from a shared bucket


def test_a_model_version_is_fetched_as_its_inference_files_alone(tmp_path):
    """A registry writer may put anything beside a version's checkpoint in the artifact store: a replica fetching
    the version downloads the files it loads from, not a disk's worth of others. (sqlite MLflow, no server.)"""
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    clip_core.save_checkpoint(clip_core.CLIP(micro_config()), tmp_path / "ckpt")
    written = {file.name: file.read_bytes() for file in (tmp_path / "ckpt").iterdir()}
    assert set(written) == set(registry.INFERENCE_FILES)
    registry.register(str(tmp_path / "ckpt"), "clip", tracking_uri=tracking, echo=lambda *_: None)
    [stored] = list(tmp_path.glob("mlartifacts/**/artifacts/checkpoint"))
    (stored / "train_state.pt").write_bytes(b"\0" * 2**20)
    (stored / "extra").mkdir()
    (stored / "extra" / "filler.bin").write_bytes(b"\0" * 2**20)

    source = registry.fetch_checkpoint("models:/clip/1", str(tmp_path / "fetched"), tracking_uri=tracking)
    fetched = {path.relative_to(tmp_path / "fetched") for path in (tmp_path / "fetched").rglob("*") if path.is_file()}
    assert fetched == {Path("artifacts", "checkpoint", name) for name in registry.INFERENCE_FILES}, fetched
    assert source.directory == str(tmp_path / "fetched" / "artifacts" / "checkpoint") and source.version == "1"
    assert {name: Path(source.directory, name).read_bytes() for name in written} == written
    assert clip_core.load_model(source.directory).config.name == "micro"

    (stored / "open_clip_config.json").unlink()  # a version registered without it: fetched without it
    source = registry.fetch_checkpoint("models:/clip@challenger", str(tmp_path / "again"), tracking_uri=tracking)
    assert sorted(path.name for path in Path(source.directory).iterdir()) == ["config.json", "model.safetensors"]
    (stored / "config.json").unlink()
    with pytest.raises(registry.RegistryError, match="version 1\\) has no checkpoint/config.json in the artifact"):
        registry.fetch_checkpoint("models:/clip/1", str(tmp_path / "once-more"), tracking_uri=tracking)


def test_a_parquet_source_whose_cells_inflate_past_the_image_limit_is_refused_before_it_is_read(tmp_path):
    from workflows.sources import SourceSpec, read_source_batch

    spec = SourceSpec(format="parquet", image_key="jpg", caption_key="txt", max_image_bytes=2**20)
    bomb = tmp_path / "bomb.parquet"  # 8 MiB of zeros: a few kB on disk, over the 1 MiB image limit
    pq.write_table(pa.table({"jpg": [bytes(8 * 2**20)], "txt": ["a caption"]}), bomb, compression="zstd")
    assert bomb.stat().st_size < 64 * 2**10
    (table,) = read_source_batch(pa.table({"uri": [str(bomb)]}), spec)
    row = table.to_pylist()[0]
    assert row["reason"] == "unreadable_source" and "cells past the image limit" in row["detail"]
    fine = tmp_path / "fine.parquet"
    pq.write_table(pa.table({"jpg": [bytes(100)] * 3, "txt": ["a", "b", "c"]}), fine)
    (table,) = read_source_batch(pa.table({"uri": [str(fine)]}), spec)
    assert table.num_rows == 3 and set(table.column("reason").to_pylist()) == {None}
