"""Preprocess stage on Ray Data: raw image-text pairs → prepared shards, a manifest, and rejects.

    read (one task per source file) → validate, decode, resize, re-encode, tokenize
        → drop exact duplicates (one ordered actor) → write shards (one task per shard)

The stream is never materialised. Every row read ends kept in a shard or rejected with a
reason in `rejects.parquet`, so `read == kept + rejected` always. Shards are content-addressed
(`shards/shard-<sha256>.parquet`) and the manifest is written last, so a failed run leaves the
previous manifest (and the shards it names) intact, and a rerun over the same output is safe.
`rejects.parquet` keeps its name, so the previous manifest is removed just before it is replaced: a
run failing in that moment leaves no manifest, never one that disagrees with the files it names.
The dataset's digest is a hash of its rows' content, independent of sharding and order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clip_core.tokenizer import TOKENIZER_ID, get_tokenizer, normalize_caption
from clip_core.transforms import ImageError, center_crop, decode_image, peek_image, resize_shortest_side

from . import storage
from .preprocess_actors import Deduplicate, Progress
from .sources import (SourceError, SourceSpec, detect_format, imagefolder_classes, plan_files, read_source_batch,
                      sample_labels)
from .tracking import dataset_input, set_experiment

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# what preprocessing makes of a source at the same options, in the pipeline's data keys: 2 since a duplicate
# is the same pixels and caption (an image's other captions are kept) and a WebDataset key names its tar; 4
# since a Parquet file's own keys name their file too, a tar cut short counts itself unreadable, a PNG's tRNS
# colour is transparent (over white), captions are tokenized as cleaned once, and duplicates are told by the
# caption in lower case (as tokenized).
# Bump it when the same source and options give other rows: a pipeline rerun then prepares them again
# (and trains again only if the data's digest changed)
OUTPUT_VERSION = 4
MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"
SHARDS_DIR = "shards"
REASONS = (
    "missing_image", "missing_caption", "empty_image", "unreadable_image", "undecodable_image", "image_too_large",
    "image_too_small", "extreme_aspect_ratio", "caption_not_utf8", "empty_caption", "caption_too_short",
    "caption_too_long", "missing_label", "invalid_label", "duplicate", "unreadable_source", "unsupported_uri",
)

PROCESSED_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("image", pa.binary()),
    ("caption", pa.string()),
    ("tokens", pa.list_(pa.int32())),
    ("label", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("metadata", pa.string()),
    ("pixel_hash", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("position", pa.int64()),  # the row's place in its source file (see sources.RAW_SCHEMA); not in shards
])
SHARD_COLUMNS = ["key", "image", "caption", "tokens", "label", "width", "height", "metadata"]
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("source", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])
# A prepared image is image_size x image_size (at most MAX_IMAGE_SIZE on a side), in one of PREPARED_FORMATS
MAX_IMAGE_SIZE = 4096
PREPARED_FORMATS = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}  # image_format → what Pillow reads it as


class PreprocessOptions(BaseModel):
    """How raw pairs become training rows. Every field has a default that works."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["webdataset", "parquet", "csv", "folder", "imagefolder", "synthetic"] | None = Field(
        None, description="detected from the source when None; folder: images with caption sidecars, "
        "imagefolder: a folder of images per class (ImageNet's val layout), labeled by folder")
    image_key: str | None = None
    caption_key: str | None = None
    label_key: str | None = None
    csv_separator: str | None = Field(None, description="a CSV source's column separator, one character ('\\t' "
                                      "or 'tab' for a tab, OpenCLIP's --csv-separator default); None: a tab in a "
                                      ".tsv, a comma otherwise")
    classnames: list[str] | str | None = Field(None, description="label i is classnames[i]; string labels map "
                                               "through it. A string is a file (local or s3://) with one per line")
    image_size: int = Field(224, gt=0, le=MAX_IMAGE_SIZE)
    image_format: str = Field("jpeg", pattern=f"^({'|'.join(PREPARED_FORMATS)})$")
    jpeg_quality: int = Field(95, ge=1, le=100)
    min_image_side: int = Field(32, ge=1)
    max_aspect_ratio: float = Field(5.0, ge=1.0)
    max_image_pixels: int = Field(64_000_000, gt=0)
    max_image_bytes: int = Field(32 * 2**20, gt=0)
    min_caption_chars: int = Field(1, ge=1)
    max_caption_chars: int = Field(1000, ge=1)
    dedupe: bool = True
    shuffle: bool = Field(True, description="write the kept rows in a random order (after dedupe), so that every "
                          "shard, and every training batch read from one, is a sample of the whole source; in "
                          "source order a source sorted by class gives batches of one class")
    shuffle_seed: int = 0
    rows_per_shard: int = Field(10_000, gt=0, description="at most this many rows per shard: a shard holds the rows "
                                "kept out of this many read, so rejected rows make it smaller")
    batch_size: int = Field(256, gt=0, description="rows per processing task")
    concurrency: int | None = Field(None, gt=0, description="at most this many processing tasks at once")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per processing task")
    progress_interval_s: float = Field(10.0, gt=0)

    @field_validator("csv_separator")
    @classmethod
    def _one_character(cls, value: str | None) -> str | None:
        value = {"\\t": "\t", "tab": "\t"}.get(value, value)  # a tab is hard to type on a command line
        if value is not None and (len(value) != 1 or value in "\"\r\n"):
            raise ValueError(f"csv_separator {value!r}: give one character other than a quote or a line break "
                             "(e.g. ',', ';', or '\\t' for a tab)")
        return value

    @model_validator(mode="after")
    def _named_classes(self):
        names = self.classnames if isinstance(self.classnames, list) else []  # a file's lines: read_lines checks
        blank = [i for i, name in enumerate(names) if not name.strip()]
        if blank:
            raise ValueError(f"class names {blank[:5]} are blank: label i is classnames[i], and each needs a name")
        return self

    @model_validator(mode="after")
    def _caption_bounds(self):
        if self.min_caption_chars > self.max_caption_chars:
            raise ValueError(f"min_caption_chars ({self.min_caption_chars}) exceeds max_caption_chars "
                             f"({self.max_caption_chars})")
        return self


class Reject(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(detail or reason)
        self.reason, self.detail = reason, detail


# --------------------------------------------------------------------------------- one row


_IMAGE_REJECTS = {"empty": "empty_image", "too_large": "image_too_large", "unsupported": "undecodable_image",
                  "undecodable": "undecodable_image"}


def prepare_image(data: bytes | None, options: PreprocessOptions) -> tuple[bytes, tuple[int, int], str]:
    """Raw bytes → (re-encoded bytes at training resolution, original size, pixel hash), or Reject."""
    if data is None:
        raise Reject("missing_image")
    if len(data) > options.max_image_bytes:
        raise Reject("image_too_large", f"{len(data):,} bytes > {options.max_image_bytes:,}")
    size = options.image_size
    try:
        with warnings.catch_warnings():  # Pillow's warnings about odd metadata: one per row would flood the log
            warnings.simplefilter("ignore")
            image = peek_image(data, max_pixels=options.max_image_pixels)
            width, height = image.size
            short, long = min(width, height), max(width, height)
            if short < options.min_image_side:
                raise Reject("image_too_small", f"{width}x{height}, shortest side < {options.min_image_side}")
            if long / short > options.max_aspect_ratio:
                raise Reject("extreme_aspect_ratio", f"{width}x{height} > {options.max_aspect_ratio}:1")
            image = decode_image(image, max_pixels=options.max_image_pixels, reduce_to=size)
    except ImageError as exc:
        raise Reject(_IMAGE_REJECTS[exc.reason], str(exc)[:200]) from None
    image = center_crop(resize_shortest_side(image, size), size)
    buffer = io.BytesIO()
    if options.image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
    elif options.image_format == "webp":
        image.save(buffer, format="WEBP", lossless=True)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue(), (width, height), hashlib.sha256(image.tobytes()).hexdigest()[:32]


def prepare_caption(data: bytes | None, options: PreprocessOptions) -> str:
    if data is None:
        raise Reject("missing_caption")
    if len(data) > 16 * options.max_caption_chars + 1024:  # before ftfy, whose time grows with it (4 MB: ~4 s)
        raise Reject("caption_too_long", f"{len(data):,} bytes, for at most {options.max_caption_chars:,} characters")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Reject("caption_not_utf8", str(exc)[:200]) from None
    caption = normalize_caption(text)
    if not caption:
        raise Reject("empty_caption")
    if len(caption) < options.min_caption_chars:
        raise Reject("caption_too_short", f"{len(caption)} < {options.min_caption_chars} characters")
    if len(caption) > options.max_caption_chars:
        raise Reject("caption_too_long", f"{len(caption):,} > {options.max_caption_chars:,} characters")
    return caption


def resolve_label(raw: str | None, classnames: list[str] | None, required: bool = False) -> int | None:
    """A label as found (an index or a class name) → its index; None for unlabeled sets."""
    raw = raw.strip() if raw is not None else None
    if not raw:
        if required:
            raise Reject("missing_label", "empty label" if raw is not None else "no label")
        return None
    if _is_index(raw):
        top = len(classnames) - 1 if classnames is not None else MAX_LABEL
        # no index has more digits than MAX_LABEL: int() of a longer run is refused (ValueError past
        # 4,300 digits, which failed the whole run) and its time grows with the digits
        digits = raw.partition(".")[0].lstrip("0") or "0"
        label = int(digits) if len(digits) <= len(str(MAX_LABEL)) else None
        if label is None or not 0 <= label <= top:
            raise Reject("invalid_label", f"label {raw[:40]}{'…' if len(raw) > 40 else ''} outside 0..{top}")
        return label
    if classnames is None:
        raise Reject("invalid_label", f"label {raw!r} is a name, but no class names were given")
    try:
        return classnames.index(raw)
    except ValueError:
        raise Reject("invalid_label", f"label {raw!r} is not one of the {len(classnames)} class names") from None


MAX_LABEL = 2**31 - 1  # labels are stored as int64; no class list is longer


def _is_index(label: str) -> bool:
    """An integer in ASCII digits (str.isdigit also takes '²' and other digits int() refuses), or written
    as a float with nothing after the point (`3.0`: pandas' to_csv of an integer column beside a NaN)."""
    return re.fullmatch(r"-?[0-9]+(\.0*)?", label) is not None


def _check_label_names(uri: str, spec: SourceSpec) -> None:
    """Names as labels with no class names to map them through would reject every row: fail before the run."""
    names = sorted({label for label in sample_labels(uri, spec) if not _is_index(label)})
    if names:
        shown = ", ".join(repr(name) for name in names[:5]) + (", …" if len(names) > 5 else "")
        raise SourceError(f"the labels in {uri} are class names ({shown}), but no class names were given to map "
                          f"them to indices: pass --classnames FILE (one name per line; line i is label i), "
                          f"or store the labels as indices")


def _fetch(uri: str | None, limit: int, missing: str) -> bytes | None:
    if uri is None:
        return None
    try:
        return storage.read_bytes(uri, max_bytes=limit)
    except FileNotFoundError:
        raise Reject(missing, f"no file at {uri}") from None
    except storage.UnsupportedURI as exc:
        raise Reject("unsupported_uri", str(exc)) from None
    except storage.TooLarge as exc:
        raise Reject("image_too_large" if missing == "missing_image" else "caption_too_long", str(exc)) from None
    except (OSError, ValueError) as exc:
        raise Reject("unreadable_image" if missing == "missing_image" else "missing_caption", str(exc)[:200]) from None


def _report_progress(progress, interval_s: float, started: float, echo: Callable[[str], None],
                     stop: threading.Event) -> None:
    import ray

    while not stop.wait(interval_s):
        try:
            processed, rejected = ray.get(progress.totals.remote(), timeout=interval_s)
        except ray.exceptions.GetTimeoutError:
            continue
        except ray.exceptions.RayError:  # a lost counter costs the progress lines, never the run
            return
        echo(f"  {processed:,} rows processed, {rejected:,} rejected before deduplication "
             f"({processed / (time.monotonic() - started):,.0f} rows/s)")


def process_batch(batch: pa.Table, options: PreprocessOptions, progress=None) -> pa.Table:
    """Ray Data UDF: raw rows → processed rows; unusable rows keep flowing with their reason."""
    tokenize = get_tokenizer()
    out = []
    for row in batch.to_pylist():
        result = {"key": row["key"], "source": row["source"], "position": row["position"], "metadata": row["metadata"]}
        try:
            if row["reason"]:
                raise Reject(row["reason"], row["detail"] or "")
            caption_bytes = (row["caption"] if row["caption_uri"] is None
                             else _fetch(row["caption_uri"], 1 << 20, "missing_caption"))
            caption = prepare_caption(caption_bytes, options)
            label = resolve_label(row["label"], options.classnames, required=options.label_key is not None)
            image_bytes = (row["image"] if row["image_uri"] is None
                           else _fetch(row["image_uri"], options.max_image_bytes, "missing_image"))
            image, (width, height), pixel_hash = prepare_image(image_bytes, options)
            ids = [tokenize.sot_token_id, *tokenize.encode(caption, max_ids=tokenize.context_length - 2,
                                                           normalized=True)]  # as OpenCLIP's of the raw text
            result.update(image=image, caption=caption, tokens=[*ids, tokenize.eot_token_id], label=label,
                          width=width, height=height, pixel_hash=pixel_hash)
        except Reject as reject:
            result.update(reason=reject.reason, detail=reject.detail or None)
        out.append(result)
    if progress is not None:
        progress.add.remote(len(out), sum(1 for row in out if row.get("reason")))
    return pa.Table.from_pylist(out, schema=PROCESSED_SCHEMA)


def _row_digest(key: str, pixel_hash: str, caption: str, label, metadata) -> int:
    text = json.dumps([key, pixel_hash, caption, label, metadata], ensure_ascii=False)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")


def write_shard(batch: pa.Table, shards_uri: str) -> pa.Table:
    """Ray Data UDF: write the kept rows of one batch as a content-addressed shard; return a
    one-row summary with the shard, its hash, and the rejected rows."""
    kept_mask = pc.is_null(batch.column("reason"))
    kept = batch.filter(kept_mask)
    rejected = batch.filter(pc.invert(kept_mask))
    shard, digest, size = None, None, 0
    content = 0
    if kept.num_rows:
        table = kept.select(SHARD_COLUMNS)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, row_group_size=1024, compression={c: ("NONE" if c == "image" else "ZSTD")
                                                                         for c in SHARD_COLUMNS})
        data = buffer.getvalue()
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        shard = f"{SHARDS_DIR}/shard-{digest[:32]}.parquet"
        storage.write_bytes(storage.join(shards_uri, storage.basename(shard)), data)
        columns = ("key", "pixel_hash", "caption", "label", "metadata")
        for row in zip(*(kept.column(c).to_pylist() for c in columns)):
            content = (content + _row_digest(*row)) % (1 << 128)
    return pa.table({
        "shard": [shard], "sha256": [digest], "rows": [kept.num_rows], "bytes": [size], "read": [batch.num_rows],
        "content": [f"{content:032x}"],
        "reject_key": [rejected.column("key").to_pylist()], "reject_source": [rejected.column("source").to_pylist()],
        "reject_reason": [rejected.column("reason").to_pylist()],
        "reject_detail": [rejected.column("detail").to_pylist()],
    })


class RejectLog:
    """Rejected rows streamed to a local Parquet file as their shards finish, so the driver holds
    none of them however many there are; counted by reason on the way."""

    def __init__(self):
        descriptor, self.path = tempfile.mkstemp(prefix="rayclip-rejects-", suffix=".parquet")
        os.close(descriptor)
        self._writer: pq.ParquetWriter | None = pq.ParquetWriter(self.path, REJECT_SCHEMA)
        self.by_reason: Counter = Counter()
        self.rows = 0

    def add(self, columns: dict[str, list]) -> None:
        table = pa.table(columns, schema=REJECT_SCHEMA)
        if table.num_rows:
            self._writer.write_table(table)
            self.by_reason.update(columns["reason"])
            self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> RejectLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        os.remove(self.path)


# ------------------------------------------------------------------------------------- run


def _ensure_ray():
    from .runtime import init_ray

    init_ray()


def preprocess(source: str, output: str, options: PreprocessOptions | None = None,
               echo: Callable[[str], None] = print) -> dict:
    """Run the stage; returns the manifest. Fails fast on sources it cannot read at all."""
    import ray

    options = options or PreprocessOptions()
    source, output = storage.absolute(source), storage.absolute(output)
    fmt = options.format or detect_format(source)
    spec = SourceSpec(format=fmt, image_key=options.image_key, caption_key=options.caption_key,
                      label_key=options.label_key, max_image_bytes=options.max_image_bytes,
                      csv_separator=options.csv_separator)
    files = plan_files(source, spec)
    spec = dataclasses.replace(spec, root=os.path.commonprefix(files).rpartition("/")[0])
    if isinstance(options.classnames, str):
        options = options.model_copy(update={"classnames": storage.read_lines(options.classnames)})
    if fmt == "synthetic" and options.classnames is None:
        from . import synthetic

        # a synthetic set's classes are its split's: zero-shot on "heldout" ranks the unseen combinations only
        split = urlparse(source).netloc or "train"
        options = options.model_copy(update={"classnames": synthetic.split_class_names(split)})
    if fmt == "imagefolder":  # labels are the class folders' places in sorted order, as ImageFolder's
        classes = imagefolder_classes(source)
        if options.classnames is None:
            options = options.model_copy(update={"classnames": classes})
        elif len(options.classnames) != len(classes):
            raise SourceError(f"{len(options.classnames)} class names for the {len(classes)} class folders of "
                              f"{source} (line i names the i-th folder in sorted order: {classes[0]}, …): give "
                              "one name per folder, or leave --classnames out to name the classes by folder")
    if spec.label_key and options.classnames is None:
        _check_label_names(files[0], spec)

    _ensure_ray()
    shards_uri = storage.join(output, SHARDS_DIR)
    started = time.monotonic()
    echo(f"preprocess: {len(files)} {fmt} source file(s) from {source} → {output}")

    progress, stop = ray.remote(num_cpus=0)(Progress).remote(), threading.Event()
    reporter = threading.Thread(target=_report_progress, args=(progress, options.progress_interval_s, started, echo,
                                                                 stop), daemon=True)
    reporter.start()
    try:
        manifest = _run(source, output, fmt, files, spec, options, shards_uri, progress)
    finally:
        stop.set()
        reporter.join()
        progress.__ray_terminate__.remote()  # after the adds already queued (ray.kill would fail them)
    elapsed = time.monotonic() - started
    manifest_counts = manifest["counts"]
    echo(f"preprocess: read {manifest_counts['read']:,}, kept {manifest_counts['kept']:,}, rejected "
         f"{manifest_counts['rejected']:,} {dict(manifest_counts['rejected_by_reason'])} in {elapsed:.1f}s "
         f"({manifest_counts['read'] / max(elapsed, 1e-9):,.0f} rows/s) → {output} (digest {manifest['digest'][:19]}…)")
    _log_to_mlflow(manifest, output)
    return manifest


def _run(source: str, output: str, fmt: str, files: list[str], spec: SourceSpec, options: PreprocessOptions,
         shards_uri: str, progress) -> dict:
    """The Ray Data pipeline, its shard summaries gathered into the manifest."""
    import ray
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    ds = ray.data.from_items([{"uri": uri} for uri in files], override_num_blocks=len(files))
    ds = ds.map_batches(read_source_batch, batch_size=1, batch_format="pyarrow", fn_kwargs={"spec": spec},
                        num_cpus=options.num_cpus)
    # a source file is read by one task: a single CSV or Parquet file would otherwise be processed in
    # that one task too (Ray Data fuses the two maps), on one core however many the cluster has
    ds = ds.repartition(target_num_rows_per_block=options.batch_size)
    ds = ds.map_batches(process_batch, batch_size=options.batch_size, batch_format="pyarrow",
                        fn_kwargs={"options": options, "progress": progress}, num_cpus=options.num_cpus,
                        compute=TaskPoolStrategy(size=options.concurrency) if options.concurrency else None)
    if options.dedupe:
        # One batch at a time: Ray Data's actors may run queued tasks out of order, and the first
        # occurrence must be the first in source order. A restarted actor would have forgotten the
        # hashes it saw: a lost dedupe actor fails the stage (a rerun redoes it) instead of letting
        # duplicates through. Ray 2.60 has no named parameter for max_restarts yet, and warns that
        # the generic one is deprecated.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            ds = ds.map_batches(Deduplicate, batch_size=None, batch_format="pyarrow", num_cpus=0.25,
                                compute=ActorPoolStrategy(size=1, max_tasks_in_flight_per_actor=1),
                                max_restarts=0)
    if options.shuffle:
        # Ray's pull-based shuffle makes an object for each pair of its blocks (the processing batches: 15
        # million for a million rows); joined to a shard's rows first (a strict repartition) they were 1,500
        # times fewer, but the demo's seed-1 run, in that other order, no longer trained in its 100 steps
        ds = ds.random_shuffle(seed=options.shuffle_seed)
    # exactly rows_per_shard rows a block, one block a shard: a write task's last batch holds what is
    # left of the blocks it was given, so blocks of other sizes would make shards of a few rows
    ds = ds.repartition(target_num_rows_per_block=options.rows_per_shard, strict=True)
    ds = ds.map_batches(write_shard, batch_size=options.rows_per_shard, batch_format="pyarrow",
                        fn_kwargs={"shards_uri": shards_uri}, num_cpus=0.5)
    ds.context.execution_options.preserve_order = True  # dedupe keeps the first in source order; shards are seeded

    shards, counts, content = [], Counter(), 0
    with RejectLog() as rejects:
        for summary in ds.iter_rows():
            counts["read"] += summary["read"]
            counts["kept"] += summary["rows"]
            if summary["shard"]:
                shards.append({"path": summary["shard"], "rows": summary["rows"], "sha256": summary["sha256"],
                               "bytes": summary["bytes"]})
            rejects.add({field: summary[f"reject_{field}"] for field in REJECT_SCHEMA.names})
            content = (content + int(summary["content"], 16)) % (1 << 128)
        return _finalize(output, source, fmt, files, options, shards, rejects, counts, content)


def _finalize(output: str, source: str, fmt: str, files: list[str], options: PreprocessOptions, shards: list[dict],
              rejects: RejectLog, counts: Counter, content: int) -> dict:
    """Rejects, then the manifest (last, atomically), then garbage shards of earlier runs."""
    rejects.close()
    identity = {"schema_version": SCHEMA_VERSION, "image_size": options.image_size,
                "image_format": options.image_format, "tokenizer": TOKENIZER_ID,
                "jpeg_quality": options.jpeg_quality if options.image_format == "jpeg" else None,
                "classnames": options.classnames, "content": f"{content:032x}", "rows": counts["kept"]}
    digest = "sha256:" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    with open(rejects.path, "rb") as fp:
        rejects_sha256 = hashlib.file_digest(fp, "sha256").hexdigest()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "digest": digest,
        "sources": [source],
        "source_files": len(files),
        "format": fmt,
        "image_size": options.image_size,
        "image_format": options.image_format,
        "tokenizer": {"id": TOKENIZER_ID, "context_length": get_tokenizer().context_length},
        "classnames": options.classnames,
        "counts": {"read": counts["read"], "kept": counts["kept"], "rejected": rejects.rows,
                   "rejected_by_reason": dict(sorted(rejects.by_reason.items()))},
        "shards": shards,
        "rejects": {"path": REJECTS, "rows": rejects.rows, "sha256": rejects_sha256},
        "options": options.model_dump(exclude={"classnames"}),
    }
    if manifest["counts"]["read"] != manifest["counts"]["kept"] + manifest["counts"]["rejected"]:
        raise RuntimeError(f"row accounting broke: {manifest['counts']}")  # never expected: a bug, not bad input
    # rejects.parquet keeps its name from run to run, so the manifest that named the previous one goes first:
    # a run failing from here on leaves no manifest rather than one that disagrees with rejects.parquet
    storage.delete(storage.join(output, MANIFEST))
    storage.copy(rejects.path, storage.join(output, REJECTS))
    storage.write_bytes(storage.join(output, MANIFEST), (json.dumps(manifest, indent=2) + "\n").encode())
    live = {storage.basename(s["path"]) for s in shards}
    shards_uri = storage.join(output, SHARDS_DIR)
    if storage.exists(shards_uri):
        for uri in storage.list_files(shards_uri, recursive=False):
            if storage.basename(uri) not in live:
                storage.delete(uri)
    return manifest


def _log_to_mlflow(manifest: dict, output: str) -> None:
    """Record the dataset as an MLflow input (digest, source, counts) when tracking is configured."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        imported = sys.modules.get("mlflow")  # no run can be active where MLflow was never imported
        if imported is None or imported.active_run() is None:
            return
    import mlflow

    dataset = dataset_input(output, manifest["digest"])
    nested = mlflow.active_run() is not None  # inside `rayclip run`: a child of the pipeline's run
    if not nested:
        set_experiment("rayclip")
    with mlflow.start_run(run_name=f"preprocess {storage.basename(output)}", nested=nested,
                          tags={"rayclip.stage": "preprocess"}):
        mlflow.log_input(dataset, context="preprocess")
        mlflow.log_params({"dataset_digest": manifest["digest"], "dataset_uri": output})
        mlflow.log_metrics({f"rows_{k}": v for k, v in manifest["counts"].items() if isinstance(v, int)})


# --------------------------------------------------------------------------------- reading

def prepared_max_pixels(image_size: int = 0) -> int:
    """The most pixels a prepared image read for a model of `image_size` may have: what preprocess writes at its
    largest (a model may read data prepared at another size), or twice the model's side."""
    return max(MAX_IMAGE_SIZE**2, 4 * image_size**2)


def open_prepared_image(data: bytes, image_size: int = 0, where: str = "a prepared image") -> Image.Image:
    """A prepared shard's image decoded as RGB through clip_core.transforms' checked opener: ImageError naming
    `where` (the row) unless it is a JPEG, PNG or WebP of at most `prepared_max_pixels(image_size)`. A shard may
    come from a bucket others write to; Pillow's own limit (179 megapixels, any of its formats) is no bound."""
    limit = prepared_max_pixels(image_size)
    try:
        image = peek_image(data, max_pixels=limit)
        if image.format not in PREPARED_FORMATS.values():
            raise ImageError(f"the image is {image.format}, not one of the formats preprocess writes "
                             f"({', '.join(PREPARED_FORMATS.values())})", "unsupported")
        return decode_image(image, max_pixels=limit)
    except ImageError as exc:
        raise ImageError(f"{where}: {exc}; prepare the data again with `rayclip preprocess`", exc.reason) from exc


def decode_batch(batch: dict, image_size: int, context_length: int = 77) -> dict:
    """Ray Data UDF: prepared rows → uint8 images [B, S, S, 3], padded tokens [B, context] and labels [B]
    (-1 where a row has none). An image that is not what preprocess writes raises ImageError naming its row."""
    images = np.empty((len(batch["image"]), image_size, image_size, 3), dtype=np.uint8)
    keys = batch.get("key")
    for i, data in enumerate(batch["image"]):
        row = f"key {str(keys[i])!r}" if keys is not None else f"{i} of a batch without keys"
        image = open_prepared_image(data, image_size, f"the prepared image of row {row}")
        if image.size != (image_size, image_size):
            image = center_crop(resize_shortest_side(image, image_size), image_size)
        images[i] = np.asarray(image)
    tokens = np.zeros((len(batch["tokens"]), context_length), dtype=np.int64)
    for i, ids in enumerate(batch["tokens"]):
        ids = list(ids)[:context_length]
        tokens[i, : len(ids)] = ids
    out = {"image": images, "tokens": tokens}
    if "label" in batch:
        out["label"] = label_array(batch["label"])
    return out


def label_array(column) -> np.ndarray:
    """A batch's label column as int64, -1 where a row has none: Ray hands a column holding nulls to a
    numpy batch as floats with NaN, a Python dict (to_pydict) as None."""
    values = np.asarray(column)
    if values.dtype == object:
        values = np.asarray([np.nan if label is None else label for label in values], dtype=np.float64)
    return np.where(np.isnan(values), -1, values).astype(np.int64) if values.dtype.kind == "f" else \
        values.astype(np.int64)


def read_manifest(uri: str) -> dict:
    manifest_uri = storage.join(uri, MANIFEST)
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no prepared dataset at {uri}: {MANIFEST} is missing (run `rayclip preprocess` first)")
    manifest = json.loads(storage.read_bytes(manifest_uri, max_bytes=256 * 2**20))
    if manifest.get("schema_version", 0) > SCHEMA_VERSION:
        raise ValueError(f"{uri} has prepared-dataset schema {manifest['schema_version']}; this rayclip reads up to "
                         f"{SCHEMA_VERSION}: upgrade rayclip")
    return manifest


def shard_uris(uri: str, manifest: dict) -> list[str]:
    """The prepared dataset's shard files, as its `manifest` lists them; a dataset without rows is refused, and
    so is a manifest that lists a file outside `uri` (`storage.join_listed`)."""
    if not manifest["shards"]:
        raise ValueError(f"the prepared dataset at {uri} has no rows ({manifest['counts']})")
    listed_in = storage.join(uri, MANIFEST)
    return [storage.join_listed(uri, shard["path"], listed_in) for shard in manifest["shards"]]


def read_prepared_table(uri: str, columns: list[str] | None = None, filters=None) -> pa.Table:
    """A whole (small) prepared dataset in memory, without Ray: for validation and evaluation sets (or
    the rows pyarrow `filters` keep)."""
    return storage.read_parquet(shard_uris(uri, read_manifest(uri)), columns, filters)


def load_prepared(uri: str, *, manifest: dict | None = None, shuffle_files: bool = False, seed: int | None = None):
    """The prepared dataset's kept rows as a Ray Dataset (columns: SHARD_COLUMNS): the shards its
    `manifest` lists (read from `uri` when not given: a caller that recorded the manifest's digest
    passes the manifest it read); shuffle with `shuffle_files` here and `local_shuffle_buffer_size`
    when iterating."""
    import ray
    from ray.data import FileShuffleConfig

    fs, _ = storage.filesystem(uri)
    paths = [storage.filesystem(shard)[1] for shard in shard_uris(uri, manifest or read_manifest(uri))]
    _ensure_ray()
    # The manifest already lists every shard, so the reader whose plan is fixed when the dataset is
    # made. Ray 2.60's default (datasource V2) lists the files and reads their footers again on
    # every execution, i.e. every epoch, in a pool of 32 fresh FooterReader actor processes: on
    # 2 cores, 8-17 s of stall per epoch against 0.7 s here (measured in the train stage).
    context = ray.data.DataContext.get_current()
    default, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, filesystem=fs,
                                     shuffle=FileShuffleConfig(seed=seed) if shuffle_files else None)
    finally:
        context.use_datasource_v2 = default

