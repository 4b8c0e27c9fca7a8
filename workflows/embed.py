"""Embed stage: a prepared dataset's image and caption embeddings as Parquet files, by Ray Data batch
inference (the evaluate stage's pool of model actors), for nearest-neighbour search, deduplication or
a downstream model (what clip-retrieval's `clip inference` writes).

    OUTPUT/embeddings/*.parquet  key, caption, label (null where the set has none), metadata (the source's
                                 per-sample JSON, img2dataset's url among it, where it has one of at most
                                 MAX_METADATA_BYTES), image_id (the same for
                                 the rows of one image: an image with several captions, a row each),
                                 image_embedding, text_embedding: fixed_size_list<float32|float16>[embed_dim],
                                 L2-normalized, so a dot product is the model's cosine similarity
    OUTPUT/embeddings.json       written last: the model (URI, registered name and version, weights
                                 sha256), the dataset (URI, digest), dimensions, dtype, each file's rows

The files are plain Parquet: pyarrow, pandas, DuckDB or Spark read the directory without rayclip, e.g.
`np.stack(pq.read_table("OUTPUT/embeddings")["image_embedding"].to_numpy(zero_copy_only=False))`.
"""

from __future__ import annotations

import json
import tempfile
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from clip_core.checkpoint import CONFIG_FILE

from . import registry, storage
from .evaluate import embedded, inference_files
from .preprocess import read_manifest

MANIFEST = "embeddings.json"
FILES = "embeddings"
FORMAT = "rayclip-embeddings/1"
MAX_METADATA_BYTES = 4096  # a row's metadata kept in the index (a URL and a few fields), which /v1/search returns


class EmbedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="checkpoint directory, s3:// prefix, or models:/NAME@ALIAS | models:/NAME/N; "
                       "also weights in other formats clip_core.load_model reads (OpenAI, OpenCLIP, Hugging Face)")
    data: str = Field(description="prepared dataset (the preprocess stage's output)")
    output: str = Field(description="directory or s3:// prefix for the Parquet files; new or empty")
    quick_gelu: bool | None = Field(None, description="the activation of weights in another format: True QuickGELU, "
                                    "False GELU, overriding what they imply; a rayclip checkpoint keeps its own")
    text: bool = Field(True, description="also embed the captions (text_embedding)")
    dtype: Literal["float32", "float16"] = Field("float32", description="of the stored embeddings (float16 halves "
                                                 "the files; cosines move by about 1e-3)")
    rows_per_file: int = Field(100_000, gt=0, description="at least this many rows per file (the last holds the rest)")
    batch_size: int = Field(256, gt=0)
    workers: int = Field(1, gt=0, description="model actors")
    use_gpu: bool = False
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    mlflow_tracking_uri: str | None = Field(None, description="where models:/ URIs resolve")


def _to_table(batch: dict, dtype: str, text: bool) -> pa.Table:
    """Embedder rows → the output's columns (vectors as fixed-size lists, which every Parquet reader knows)."""
    def vectors(features: np.ndarray) -> pa.FixedSizeListArray:
        values = np.ascontiguousarray(features, dtype=dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

    labels = np.asarray(batch["label"], dtype=np.int64)
    # (a set whose rows have none comes as a float NaN column: Ray Data's numpy batches have no null strings)
    metadata = [m if isinstance(m, str) and len(m.encode("utf-8", "surrogatepass")) <= MAX_METADATA_BYTES else None
                for m in batch["metadata"]]
    columns = {"key": pa.array(batch["key"], pa.string()), "caption": pa.array(batch["caption"], pa.string()),
               "label": pa.array(labels, pa.int64(), mask=labels < 0), "metadata": pa.array(metadata, pa.string()),
               # rows of one image (several captions, a row each) share it: /v1/search finds the image once
               "image_id": pa.array(batch["image_id"], pa.string()),
               "image_embedding": vectors(batch["image_features"])}
    if text:
        columns["text_embedding"] = vectors(batch["text_features"])
    return pa.table(columns)


def _check_output(uri: str) -> None:
    if storage.exists(uri) and (not storage.is_dir(uri) or storage.list_files(uri)):
        raise FileExistsError(f"{uri} exists and is not an empty directory: embeddings go to a new or empty "
                              "directory, so its files are exactly one run's; remove it or choose another output")


def embed(config: EmbedConfig, echo=print) -> dict:
    """Write the embeddings and their manifest; returns the manifest."""
    import ray

    from .runtime import init_ray

    dataset_manifest = read_manifest(config.data)  # a missing set fails before any work starts
    _check_output(config.output)
    init_ray()
    with tempfile.TemporaryDirectory(prefix="rayclip-embed-") as scratch:
        source = registry.fetch_checkpoint(config.model, scratch, tracking_uri=config.mlflow_tracking_uri,
                                           quick_gelu=config.quick_gelu)
        files, model_config = inference_files(source)
    image_size = model_config.vision.image_size
    echo(f"embed: {config.data} ({dataset_manifest['counts']['kept']:,} rows) with {config.model} "
         f"(image size {image_size}) on {config.workers} model actor(s)")
    rows = embedded([config.data], ray.put(files), image_size, batch_size=config.batch_size, workers=config.workers,
                    use_gpu=config.use_gpu, precision=config.precision, with_text=[config.text],
                    columns=("caption", "metadata"))
    rows = rows.map_batches(_to_table, batch_size=config.batch_size, batch_format="numpy",
                            fn_kwargs={"dtype": config.dtype, "text": config.text})
    fs, path = storage.filesystem(storage.join(config.output, FILES))
    rows.write_parquet(path, filesystem=fs, min_rows_per_file=config.rows_per_file)

    written = [{"path": f"{FILES}/{storage.basename(uri)}", "rows": _rows(uri)}
               for uri in storage.list_files(storage.join(config.output, FILES))]
    total = sum(file["rows"] for file in written)
    if total != dataset_manifest["counts"]["kept"]:  # never expected: a bug or a changed dataset, not bad input
        raise RuntimeError(f"embedded {total} rows of {config.data}, whose manifest counts "
                           f"{dataset_manifest['counts']['kept']}: the output at {config.output} is incomplete")
    manifest = {
        "format": FORMAT,
        "model": {"uri": config.model, "name": source.name, "version": source.version,
                  "weights_sha256": json.loads(files[CONFIG_FILE]).get("weights_sha256"), "image_size": image_size,
                  "quick_gelu": model_config.quick_gelu},  # weights in another format may run with either
        "dataset": {"uri": config.data, "digest": dataset_manifest["digest"]},
        "embed_dim": model_config.embed_dim,
        "dtype": config.dtype,
        "columns": ["key", "caption", "label", "metadata", "image_id", "image_embedding",
                    *(["text_embedding"] if config.text else [])],
        "metadata_bytes": metadata_bytes(config.output),  # what an Index replica holds of it
        "normalized": True,
        "rows": total,
        "files": written,
    }
    storage.write_bytes(storage.join(config.output, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    echo(f"embed: {total:,} rows in {len(written)} file(s) -> {config.output}")
    return manifest


def metadata_bytes(uri: str) -> int:
    """The bytes of the metadata column of the embeddings written under `uri`."""
    table = storage.read_parquet(storage.list_files(storage.join(uri, FILES)), columns=["metadata"])
    return int(pc.sum(pc.binary_length(table["metadata"])).as_py() or 0)


def _rows(uri: str) -> int:
    fs, path = storage.filesystem(uri)
    with fs.open_input_file(path) as f:
        return pq.read_metadata(f).num_rows


def read_embeddings(uri: str) -> tuple[dict, pa.Table]:
    """The manifest and the rows of the embeddings at `uri` (the files its manifest lists, which must lie
    under `uri`: `storage.join_listed`)."""
    manifest = read_embeddings_manifest(uri)
    listed_in = storage.join(uri, MANIFEST)
    return manifest, storage.read_parquet([storage.join_listed(uri, file["path"], listed_in)
                                           for file in manifest["files"]])


def read_embeddings_manifest(uri: str) -> dict:
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no embeddings at {uri}: {MANIFEST} is missing (make them with `rayclip embed`; "
                                "an interrupted run writes none)")
    manifest = json.loads(storage.read_bytes(manifest_uri, max_bytes=64 * 2**20))
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_uri} is not a manifest of `rayclip embed` ({FORMAT}), or one of a newer "
                         "rayclip: make the embeddings again with this version")
    return manifest
