"""Raw image-text sources: planning (which files, which format) and reading them into raw rows.

Every reader turns one source file into batches of *raw rows* with one schema (RAW_SCHEMA):
the image as bytes or as a URI still to fetch, the caption as raw bytes (so invalid UTF-8 can
be rejected rather than crash), an optional label, passthrough metadata, and a `reason` when
the row is already known to be unusable (an image without caption in a WebDataset shard, an
unreadable shard). Nothing is dropped here: every sample read becomes exactly one row, numbered
by its place in its file (`position`).

Planning happens on the driver and fails fast: a missing source, a missing column or an
unknown format is an error naming what was expected and what was found.
"""

from __future__ import annotations

import collections
import csv
import io
import itertools
import json
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage, synthetic

FORMATS = ("webdataset", "parquet", "csv", "folder", "imagefolder", "synthetic")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff")
_IMAGE_SUFFIXES = tuple(f".{extension}" for extension in IMAGE_EXTENSIONS)
READ_BATCH_ROWS = 256
SAMPLED_MEMBERS = 100  # a WebDataset source's first shard is checked for its fields on this many members
# a .json document read for its caption (--caption-key json) is parsed whole, in objects several times its size
MAX_CAPTION_DOCUMENT_BYTES = 2**20
# A Parquet row group's columns are read whole, whatever the batch size: a read task holds about twice a row
# group's uncompressed bytes (one 572 MiB row group of images, 1.2 GB). Larger ones are refused, not read
MAX_ROW_GROUP_BYTES = 256 * 2**20
# UTF-8, and a byte-order mark before the header (Excel's "CSV UTF-8") is no part of the first column's name
CSV_ENCODING = "utf-8-sig"
URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

RAW_SCHEMA = pa.schema([
    ("key", pa.string()),
    ("source", pa.string()),
    ("image", pa.binary()),
    ("image_uri", pa.string()),
    ("caption", pa.binary()),
    ("caption_uri", pa.string()),
    ("label", pa.string()),  # as found (an index or a class name); resolved in processing
    ("metadata", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
    ("position", pa.int64()),  # the row's place in its source file, 0 first: what tells it from every other row
])


@dataclass(frozen=True)
class SourceSpec:
    """What to read and how: the format and which fields hold the image, caption and label."""

    format: str
    image_key: str | None = None
    caption_key: str | None = None
    label_key: str | None = None
    max_image_bytes: int = 32 * 2**20
    root: str = ""  # the folder the planned files share: a Parquet or CSV row's key is its file's path under it
    csv_separator: str | None = None  # a CSV's column separator; None: a tab in a .tsv, a comma otherwise

    def file_key(self, uri: str, index: int | str) -> str:
        """A row's key from its file and its place there: `part-0.parquet:7` (a Parquet or CSV row's index, or
        a Parquet file's own `key`), `shard-00003.tar:000042` (a WebDataset sample's key), or
        `year=2024/part-0.parquet:7` where another file of the source has the same name."""
        name = uri[len(self.root):].lstrip("/") if self.root and uri.startswith(self.root) else storage.basename(uri)
        return f"{name}:{index}"

    def csv_delimiter(self, uri: str) -> str:
        return self.csv_separator or ("\t" if uri.lower().endswith(".tsv") else ",")

    @property
    def image_field(self) -> str:
        return self.image_key or {"parquet": "image", "csv": "filepath"}.get(self.format, "")

    @property
    def caption_field(self) -> str:
        return self.caption_key or {"webdataset": "txt", "folder": "txt"}.get(self.format, "caption")


class SourceError(ValueError):
    """A source that cannot be read at all: fails the run before any work starts."""


# ------------------------------------------------------------------------------------ planning


def detect_format(source: str) -> str:
    if source.startswith("synthetic://"):
        return "synthetic"
    lowered = source.lower()
    for suffix, fmt in ((".tar", "webdataset"), (".parquet", "parquet"), (".csv", "csv"), (".tsv", "csv")):
        if lowered.endswith(suffix):
            return fmt
    if "{" not in source and storage.is_dir(source):
        files = storage.list_files(source)
        if any(f.lower().endswith(".tar") for f in files):
            return "webdataset"
        images = {f.rpartition(".")[0] for f in files if f.lower().endswith(_IMAGE_SUFFIXES)}
        # images captioned by a file beside them (any sidecar of the same name), as img2dataset's `files`
        # output holds them: with a metadata .parquet a shard, which is no table of the images
        if any(f.rpartition(".")[0] in images for f in files if not f.lower().endswith(_IMAGE_SUFFIXES)):
            return "folder"
        for suffix, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".tsv", "csv")):
            if any(f.lower().endswith(suffix) for f in files):
                return fmt
        if images:  # labeled by class folder, else (without sidecars) a folder whose captions planning asks for
            return "imagefolder" if _imagefolder(source, files)[1] else "folder"
    missing = "" if "{" in source or storage.exists(source) else f"; nothing is at {source}; {_found_instead(source)}"
    raise SourceError(f"cannot tell the format of {source!r}: pass --format one of {', '.join(FORMATS)}{missing}")


def _found_instead(uri: str, shown: int = 10) -> str:
    """What is where a missing `uri` was expected: the first names in its folder, or that there is no folder."""
    folder = storage.dirname(uri)
    if not storage.is_dir(folder):
        return f"its folder {folder} does not exist"
    fs, path = storage.filesystem(folder)
    try:
        names = sorted(posixpath.basename(i.path) + ("/" if i.type == pafs.FileType.Directory else "")
                       for i in fs.get_file_info(pafs.FileSelector(path)))
    except OSError as exc:
        return f"its folder {folder} cannot be listed ({exc})"
    more = f", … ({len(names)} in all)" if len(names) > shown else ""
    return f"its folder {folder} holds: {', '.join(names[:shown]) or 'nothing'}{more}"


def plan_files(source: str, spec: SourceSpec) -> list[str]:
    """The files (or synthetic chunks) one source expands to, checked to exist and hold the fields."""
    if spec.format not in FORMATS:
        raise SourceError(f"unknown format {spec.format!r}; choose one of {', '.join(FORMATS)}")
    if spec.format == "synthetic":
        return _plan_synthetic(source)
    if spec.format == "imagefolder":
        given = [f"--{role}-key" for role in ("image", "caption", "label") if getattr(spec, f"{role}_key")]
        if given:
            raise SourceError(f"an imagefolder source takes no {', '.join(given)}: its images are labeled by "
                              "their class folder and captioned with its name (images with sidecars are "
                              "--format folder)")
        if not storage.is_dir(source):
            raise SourceError(f"image folder {source} does not exist or is not a directory; {_found_instead(source)}")
        if not imagefolder_classes(source):
            raise SourceError(f"{source} has no subfolders of images: an imagefolder source holds a folder of "
                              "images per class (an ImageNet val directory); images beside captions are --format "
                              "folder")
        return [source]
    if spec.format == "folder":
        if not storage.is_dir(source):
            raise SourceError(f"image folder {source} does not exist or is not a directory; {_found_instead(source)}")
        extensions = {name.rpartition(".")[2].lower() for name in storage.list_files(source)
                      if "." in storage.basename(name)}
        _check_extensions(extensions, f"the files of {source}", spec)
        return [source]
    suffixes = {"webdataset": (".tar",), "parquet": (".parquet",), "csv": (".csv", ".tsv")}[spec.format]
    names = storage.expand_braces(source)
    if len(names) == 1 and storage.is_dir(names[0]):
        files = storage.list_files(names[0], suffixes)
        if not files:
            raise SourceError(f"{source} holds no {'/'.join(suffixes)} files")
    else:
        missing = [name for name in names if not storage.exists(name)]
        if missing:
            raise SourceError(f"{len(missing)} of {len(names)} source files do not exist, e.g. {missing[0]}; "
                              f"{_found_instead(missing[0])}")
        files = names
    if spec.format == "webdataset":
        _check_webdataset_members(files[0], spec)
    elif spec.format == "parquet":
        for uri in files:
            _check_parquet_columns(uri, spec)
    elif spec.format == "csv":
        for uri in files:
            _check_csv_columns(uri, spec)
    return files


def _check_parquet_columns(uri: str, spec: SourceSpec) -> None:
    fs, path = storage.filesystem(uri)
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
    except (OSError, pa.ArrowInvalid) as exc:
        raise SourceError(f"cannot read the Parquet schema of {uri}: {exc}") from exc
    for role, column in (("image", spec.image_field), ("caption", spec.caption_field), ("label", spec.label_key)):
        if column and column not in schema.names:
            raise SourceError(f"{role} column {column!r} not found in {uri}; columns are: {', '.join(schema.names)}")
        if column and not _holds(role, schema.field(column).type):
            raise SourceError(f"{role} column {column!r} of {uri} holds {schema.field(column).type}, not "
                              f"{_HOLDS[role]}" + (" (several captions an image: one row for each first)"
                                                   if pa.types.is_list(schema.field(column).type) else ""))


_HOLDS = {"image": "encoded image bytes (binary, or Hugging Face's struct of bytes) or their paths (string)",
          "caption": "text (string or binary)", "label": "an integer or a class name"}


def _holds(role: str, type_: pa.DataType) -> bool:
    text = pa.types.is_string(type_) or pa.types.is_large_string(type_) or pa.types.is_binary(type_) or \
        pa.types.is_large_binary(type_)
    if role == "image":
        return text or (pa.types.is_struct(type_) and type_.get_field_index("bytes") >= 0)
    if role == "label":
        return text or pa.types.is_integer(type_) or pa.types.is_floating(type_)
    return text


def _check_webdataset_members(uri: str, spec: SourceSpec) -> None:
    """Checks the first shard's first members for each field; an unreadable shard is left to the run,
    which rejects it as a row."""
    fs, path = storage.filesystem(uri)
    extensions, members = set(), 0
    try:
        with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if member.isfile():
                    extensions.add(_webdataset_split(member.name)[1])
                    members += 1
                    if members == SAMPLED_MEMBERS:
                        break
    except (OSError, tarfile.TarError):
        return
    _check_extensions(extensions, f"the first {members} members of {uri}", spec)


def _check_extensions(extensions: set[str], where: str, spec: SourceSpec) -> None:
    """A wrong --image-key/--caption-key/--label-key fails here, not as every row rejected. A field that only
    some samples lack is bad input, rejected row by row."""
    image = (spec.image_key,) if spec.image_key else IMAGE_EXTENSIONS
    for role, wanted in (("image", image), ("caption", (spec.caption_field,)), ("label", (spec.label_key,))):
        if extensions and wanted[0] and not extensions & set(wanted):
            raise SourceError(f"no {role} (.{'/.'.join(wanted)}) among {where}; extensions found: "
                              f"{', '.join(sorted(extensions))} (choose with --{role}-key)")


def _check_csv_columns(uri: str, spec: SourceSpec) -> None:
    fs, path = storage.filesystem(uri)
    with fs.open_input_stream(path) as stream:
        first_line = io.TextIOWrapper(stream, encoding=CSV_ENCODING, errors="surrogateescape", newline="").readline()
    delimiter = spec.csv_delimiter(uri)
    header = next(csv.reader([first_line], delimiter=delimiter), [])
    for role, column in (("image", spec.image_field), ("caption", spec.caption_field), ("label", spec.label_key)):
        if column and column not in header:
            raise SourceError(f"{role} column {column!r} not found in {uri}; columns are: {', '.join(header)} "
                              f"({_separator_hint(first_line, delimiter) or f'choose with --{role}-key'})")


def _separator_hint(first_line: str, delimiter: str) -> str | None:
    """What to pass for a header without `delimiter` but with another separator: OpenCLIP's --csv-separator
    is a tab by default, so its .csv files are often tab-separated."""
    other = next((c for c in ",\t;|" if c in first_line), None) if delimiter not in first_line else None
    if other is None:
        return None
    shown = "\\t" if other == "\t" else other
    return (f"the header is separated by {other!r}, not {delimiter!r}: pass --csv-separator '{shown}', or set "
            f"csv_separator in a pipeline config's preprocess options")


def _plan_synthetic(source: str, chunk: int = 500) -> list[str]:
    """synthetic://<split>?count=N&seed=S&image_size=P → chunk URIs with #start-stop fragments."""
    parsed = urlparse(source)
    split = parsed.netloc or "train"
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    unknown = set(query) - {"count", "seed", "image_size"}
    if unknown:
        raise SourceError(f"unknown synthetic option(s) {sorted(unknown)} in {source}; use count, seed, image_size")
    if split not in synthetic.SPLITS:
        raise SourceError(f"unknown synthetic split {split!r} in {source}; choose one of {synthetic.SPLITS}")
    bounds = {"count": (1, 10**8), "seed": (0, 2**32 - 1), "image_size": (8, 1024)}
    for name, value in query.items():
        low, high = bounds[name]
        if not re.fullmatch(r"[0-9]+", value) or not low <= int(value) <= high:
            raise SourceError(f"synthetic {name}={value!r} in {source}: give an integer in {low}..{high}")
    count = int(query.get("count", 1000))
    base = source.split("#", 1)[0]
    return [f"{base}#{start}-{min(start + chunk, count)}" for start in range(0, count, chunk)]


# ------------------------------------------------------------------------------------- reading


class _Rows:
    """Collects one source file's raw rows, numbered in the order read (`position`), and hands them out
    as RAW_SCHEMA tables of READ_BATCH_ROWS."""

    def __init__(self):
        self.rows: list[dict] = []
        self.added = 0

    def add(self, **row) -> pa.Table | None:
        # a reader of part of a file (a synthetic chunk) numbers its rows from the part's start itself
        position = row.pop("position", self.added)
        # names read with surrogateescape (a tar member's, a CSV cell's) may hold bytes that are not UTF-8
        self.rows.append({**{k: _printable(v) if isinstance(v, str) else v for k, v in row.items()},
                          "position": position})
        self.added += 1
        return self.flush() if len(self.rows) >= READ_BATCH_ROWS else None

    def flush(self) -> pa.Table | None:
        if not self.rows:
            return None
        rows, self.rows = self.rows, []
        try:
            return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
        except (pa.ArrowException, TypeError, ValueError, OverflowError):  # some row holds what the schema cannot
            return pa.Table.from_pylist([_storable(row) for row in rows], schema=RAW_SCHEMA)


def _printable(text: str) -> str:
    """`text` with bytes that are not UTF-8 (surrogate escapes) shown as U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _storable(row: dict) -> dict:
    """The row, or the reject that says which of its fields is not what the source's format holds (a
    list where a caption belongs, say): one row lost and counted, not the read task."""
    for name, value in row.items():
        try:
            pa.array([value], type=RAW_SCHEMA.field(name).type)
        except (pa.ArrowException, TypeError, ValueError, OverflowError) as exc:
            return {"key": str(row.get("key")), "source": str(row.get("source")), "position": row["position"],
                    "reason": "unreadable_source",
                    "detail": f"{name}: {type(value).__name__} {str(value)[:80]!r} ({exc})"[:500]}
    return row


def read_source_batch(batch: pa.Table, spec: SourceSpec) -> Iterator[pa.Table]:
    """Ray Data map_batches UDF: a batch of file URIs → raw-row tables, one file at a time."""
    reader = _READERS[spec.format]
    for uri in batch.column("uri").to_pylist():
        rows = _Rows()
        try:
            for row in reader(uri, spec):
                table = rows.add(**row)
                if table is not None:
                    yield table
        except Exception as exc:  # a shard that cannot be read is one rejected row, not a failed run
            rows.add(key=f"{storage.basename(uri)}#unreadable", source=uri, reason="unreadable_source",
                     detail=f"{type(exc).__name__}: {exc}"[:500])
        table = rows.flush()
        if table is not None:
            yield table


def sample_labels(uri: str, spec: SourceSpec, rows: int = SAMPLED_MEMBERS) -> list[str]:
    """The non-empty labels among the first `rows` samples of one source file, for planning to check;
    what cannot be read here is left to the run, which rejects it row by row."""
    labels = []
    try:
        for row in itertools.islice(_READERS[spec.format](uri, spec), rows):
            if (row.get("label") or "").strip():
                labels.append(row["label"].strip())
    except Exception:  # as in read_source_batch: an unreadable file becomes the run's rejected row
        pass
    return labels


def _webdataset_split(name: str) -> tuple[str, str]:
    """WebDataset's member naming: `dir/key.ext.more` → (`dir/key`, `ext.more`)."""
    directory, base = posixpath.split(name)
    stem, _, extension = base.partition(".")
    return posixpath.join(directory, stem), extension.lower()


def _read_webdataset(uri: str, spec: SourceSpec) -> Iterator[dict]:
    fs, path = storage.filesystem(uri)
    image_exts = (spec.image_key,) if spec.image_key else IMAGE_EXTENSIONS
    wanted = {*image_exts, spec.caption_field, spec.label_key, "json"}
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as archive:
        key, members, seen = None, {}, collections.Counter()
        for member in archive:
            if not member.isfile():
                continue
            member_key, extension = _webdataset_split(member.name)
            if member_key != key:
                if key is not None:
                    yield _webdataset_row(uri, key, members, spec, image_exts, seen[key])
                    members = {}
                seen[member_key] += 1
            key = member_key
            limit = MAX_CAPTION_DOCUMENT_BYTES if extension == spec.caption_field == "json" else spec.max_image_bytes
            if extension not in wanted:  # named in messages, never read: a sample holds only what is used
                members[extension] = None
            elif member.size > limit:
                members[extension] = ("too_large", member.size, limit)
            else:
                members[extension] = archive.extractfile(member).read()
        if key is not None:
            yield _webdataset_row(uri, key, members, spec, image_exts, seen[key])
        _check_tar_end(archive)


def _check_tar_end(archive: tarfile.TarFile) -> None:
    """Raises if a tar read to its end as a stream stopped before its end-of-archive marker: tarfile ends the
    iteration without an error at a corrupt member header, or at the end of a file cut short between members
    (an interrupted download or img2dataset run), and every sample after would be lost uncounted."""
    stream, header = archive.fileobj, archive.offset  # where the header that ended the iteration began
    read = stream.tell() - header
    rest = stream.read(1 << 16)
    if read < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"the tar ends at byte {header + read:,}, inside or before a member's header and "
                                "without the end-of-archive marker: the file is truncated, so the samples after "
                                "the last one read are missing; copy or write it again")
    if rest.strip(tarfile.NUL):
        raise tarfile.ReadError(f"the reading stopped at byte {header:,} with data after it: a corrupt member "
                                "header (a failed checksum), or another tar appended to this one; the samples "
                                "after it are not read: copy or write the tar again (one archive a file)")


def _webdataset_row(uri: str, key: str, members: dict, spec: SourceSpec, image_exts, occurrence: int = 1) -> dict:
    # keyed with its tar as a CSV row with its file: shards written apart (by hand, by several img2dataset runs)
    # each number their samples from 000, and evaluation sorts and looks up rows by key
    # a key met again after other samples (webdataset groups only adjacent members) is another row, keyed apart
    row = {"key": spec.file_key(uri, key if occurrence == 1 else f"{key}#{occurrence}"), "source": uri}
    split = (f"; {key}'s members are not together in the tar, as WebDataset needs (write it with "
             "`tar --sort=name` or webdataset's ShardWriter)") if occurrence > 1 else ""
    image_ext = next((ext for ext in image_exts if ext in members), None)
    caption = members.get(spec.caption_field)
    oversized = [ext for ext, value in members.items() if isinstance(value, tuple)]
    if oversized:
        reason = ("image_too_large" if oversized[0] in image_exts else
                  "caption_too_long" if oversized[0] == spec.caption_field else "unreadable_source")
        _, size, limit = members[oversized[0]]
        return {**row, "reason": reason, "detail": f"member {key}.{oversized[0]} is {size:,} bytes, over the limit "
                f"of {limit:,}"}
    if image_ext is None:
        return {**row, "reason": "missing_image",
                "detail": f"members: {sorted(members)}; no {'/'.join(image_exts)}{split}"}
    if caption is None:
        return {**row, "reason": "missing_caption",
                "detail": f"members: {sorted(members)}; no .{spec.caption_field}{split}"}
    metadata = members.get("json")
    label = members.get(spec.label_key) if spec.label_key else None
    fields = _document_caption(caption, f"member {key}.json") if spec.caption_field == "json" else {"caption": caption}
    if "reason" in fields:
        return {**row, **fields}
    return {**row, "image": members[image_ext], **fields,
            "label": label.decode("utf-8", "replace").strip() if label is not None else None,
            "metadata": metadata.decode("utf-8", "replace") if metadata is not None else None}


def _document_caption(document: bytes, where: str) -> dict:
    """The `caption` of a .json document read as the caption (--caption-key json), the per-sample metadata
    webdataset and img2dataset write ({"caption": "…", "url": …}), as the row's field; else its missing_caption
    reject."""
    try:
        fields = json.loads(document)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested past the parser's depth
        return {"reason": "missing_caption", "detail": f"{where} is not a JSON document: {exc}"[:500]}
    caption = fields.get("caption") if isinstance(fields, dict) else None
    if not isinstance(caption, str):
        found = f"its fields: {', '.join(map(str, fields))}" if isinstance(fields, dict) else type(fields).__name__
        return {"reason": "missing_caption", "detail": f"{where} has no text 'caption' field ({found})"[:500]}
    return {"caption": caption.encode("utf-8", "surrogatepass")}  # a lone surrogate ('\ud800'): caption_not_utf8


def _read_parquet(uri: str, spec: SourceSpec) -> Iterator[dict]:
    fs, path = storage.filesystem(uri)
    base = storage.dirname(uri)
    with fs.open_input_file(path) as f:
        parquet = pq.ParquetFile(f)
        columns = [c for c in (spec.image_field, spec.caption_field, spec.label_key) if c]
        has_key = "key" in parquet.schema_arrow.names
        if has_key and "key" not in columns:
            columns.append("key")
        _check_row_group_sizes(parquet.metadata, columns, spec)
        index = 0
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            for record in batch.to_pylist():
                image = record[spec.image_field]
                if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
                    image = image.get("bytes")
                image_uri = None
                if isinstance(image, str):  # a text column names each image, as a CSV's cells do
                    image, image_uri = None, _image_uri(image.strip(), base) if image.strip() else None
                caption = record[spec.caption_field]
                label = record.get(spec.label_key) if spec.label_key else None
                if isinstance(label, float):  # integer labels in a float column (pandas' ints beside a NaN)
                    label = None if label != label else (int(label) if label.is_integer() else label)
                # the file's own key (img2dataset's) with the file, as a WebDataset sample's with its tar: files
                # written apart (cc3m/00000.parquet, cc12m/00000.parquet) each number theirs from 0
                key = spec.file_key(uri, record["key"] if has_key and record.get("key") is not None else index)
                yield {"key": key, "source": uri, "image": image, "image_uri": image_uri,
                       "caption": caption.encode("utf-8") if isinstance(caption, str) else caption,
                       "label": None if label is None else str(label),
                       "reason": "missing_image" if image is None and image_uri is None else
                       ("missing_caption" if caption is None else None)}
                index += 1


def _check_row_group_sizes(metadata, columns: list[str], spec: SourceSpec) -> None:
    """Refuse a Parquet file whose row groups hold more bytes, uncompressed, than their rows can at the
    image limit (plus 1 MiB a row for caption, label and key): a few kilobytes of compressed zeros can
    be a cell of gigabytes, which reading the row group would hold in memory before any limit applies.
    And one whose row groups, however honest, hold more than MAX_ROW_GROUP_BYTES: pyarrow's default
    row_group_size (a million rows) writes a table of images as one row group, gigabytes read at once."""
    budget = spec.max_image_bytes + 2**20
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        held = sum(group.column(c).total_uncompressed_size for c in range(group.num_columns)
                   if group.column(c).path_in_schema.split(".")[0] in columns)
        if held > group.num_rows * budget:
            raise ValueError(f"row group {g} holds {held:,} bytes uncompressed in {group.num_rows} row(s), over "
                             f"{budget:,} a row: cells past the image limit; not read")
        if held > MAX_ROW_GROUP_BYTES:
            rows = max(1, group.num_rows * MAX_ROW_GROUP_BYTES // (2 * held))  # about half the limit a group
            raise ValueError(f"row group {g} holds {held:,} bytes uncompressed in {group.num_rows:,} rows, over the "
                             f"{MAX_ROW_GROUP_BYTES:,} a read task holds at once; not read: rewrite the file with "
                             f"smaller row groups, e.g. pyarrow.parquet.write_table(table, path, "
                             f"row_group_size={rows})")


def _read_csv(uri: str, spec: SourceSpec) -> Iterator[dict]:
    fs, path = storage.filesystem(uri)
    base = storage.dirname(uri)
    # a cell up to the image limit (csv's default, 128 KiB, failed the whole file on one long caption;
    # the caption limit rejects that row), and no larger: a quote left open holds at most that much
    csv.field_size_limit(max(csv.field_size_limit(), spec.max_image_bytes))
    with fs.open_input_stream(path) as stream:
        text = io.TextIOWrapper(stream, encoding=CSV_ENCODING, errors="surrogateescape", newline="")
        for index, record in enumerate(_csv_records(text, spec.csv_delimiter(uri))):
            if isinstance(record, str):
                yield {"key": spec.file_key(uri, index), "source": uri, "reason": "unreadable_source",
                       "detail": record}
                continue
            image = (record.get(spec.image_field) or "").strip()
            caption = record.get(spec.caption_field)
            label = record.get(spec.label_key) if spec.label_key else None
            row = {"key": spec.file_key(uri, index), "source": uri,
                   "caption": caption.encode("utf-8", "surrogateescape") if caption is not None else None,
                   "label": label}
            if not image:
                yield {**row, "reason": "missing_image", "detail": f"empty {spec.image_field!r} cell"}
                continue
            yield {**row, "image_uri": _image_uri(image, base),
                   "reason": "missing_caption" if caption is None else None}


def _image_uri(cell: str, base: str) -> str:
    """The image a CSV cell or a Parquet text cell names: a path relative to its table's folder `base`, or
    absolute; any scheme:// is absolute too, and storage reads file:// and s3:// and refuses the others (the
    row's unsupported_uri: an image is never downloaded)."""
    return cell if URI_SCHEME.match(cell) or posixpath.isabs(cell) else storage.join(base, cell)


class _Lines:
    """A text file's lines for csv, numbered, with those of the record being read kept (`record`), and lines
    taken back to be read again (`again`) before the file's next."""

    def __init__(self, text: io.TextIOBase):
        self.numbered = enumerate(text, 1)
        self.again: collections.deque[tuple[int, str]] = collections.deque()
        self.record: list[tuple[int, str]] = []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        numbered = self.again.popleft() if self.again else next(self.numbered)
        self.record.append(numbered)
        return numbered[1]


def _csv_records(text: io.TextIOBase, delimiter: str) -> Iterator[dict | str]:
    """The records of a CSV or TSV file quoted as pandas and Python's csv write them (a quote inside a quoted
    cell doubled, a line break inside one kept), a .tsv too: OpenCLIP's are pandas'. Read strictly, a quote
    never closed or text after a closing one is an error, not a cell that swallows the lines after it unseen:
    that record's first line is a string saying what and where, and the lines after it are read again (a
    stray quote opening a caption took every line to the end of the file with it, uncounted)."""
    lines = _Lines(text)
    records = csv.DictReader(lines, delimiter=delimiter, strict=True)
    _ = records.fieldnames  # the header first: a header that cannot be read fails the file
    while True:
        lines.record = []
        try:
            record = next(records)
        except StopIteration:
            return
        except csv.Error as exc:
            (first_line, _), *rest = lines.record or [(0, "")]
            lines.again.extendleft(reversed(rest))
            more = f" (lines {first_line}-{rest[-1][0]} read as one record: the lines after the first are read " \
                   "again)" if rest else ""
            record = (f"line {first_line}: {exc}{more} (a cell that opens with a quote closes with one, and a quote "
                      "inside it is written twice)")
        else:
            extra = [cell for cell in record.get(None, ()) if cell.strip()]  # csv keeps cells past the header's there
            if extra:
                record = (f"line {lines.record[0][0]}: {len(records.fieldnames) + len(record[None])} cells where the "
                          f"header has {len(records.fieldnames)} (the first left over: {extra[0][:60]!r}): a cell "
                          f"holding the separator {delimiter!r} is quoted, as pandas' to_csv writes it")
        yield record


def _read_folder(uri: str, spec: SourceSpec) -> Iterator[dict]:
    """Images with a sidecar caption file of the same stem (`cat1.jpg` + `cat1.txt`), and optionally a
    label and a `.json` passed through as metadata (img2dataset's `files` output)."""
    files = storage.list_files(uri)
    by_stem: dict[str, dict[str, str]] = {}
    for name in files:
        stem, _, extension = name.rpartition(".")
        by_stem.setdefault(stem, {})[extension.lower()] = name
    fs, path = storage.filesystem(uri)
    root = storage.to_uri(fs, path).rstrip("/") + "/"  # as list_files names them (`dir`, `./dir`, file://)
    image_exts = (spec.image_key,) if spec.image_key else IMAGE_EXTENSIONS
    for stem, members in sorted(by_stem.items()):
        found = [ext for ext in image_exts if ext in members]
        image_ext = found[0] if found else None
        for other in found[1:]:  # cat.jpg, cat.png, cat.txt: the caption is cat.jpg's; cat.png is counted
            name = storage.basename(stem)
            yield {"key": f"{stem[len(root):]}.{other}", "source": members[other], "image_uri": members[other],
                   "reason": "missing_caption", "detail": f"{name}.{image_ext} has the stem's caption sidecar"
                   f"{'' if spec.caption_field in members else ' (none here)'}: give each image a stem of its own"}
        if image_ext is None:
            if spec.caption_field in members:  # a caption whose image is missing
                yield {"key": stem[len(root):], "source": members[spec.caption_field], "reason": "missing_image",
                       "detail": f"no image beside {storage.basename(members[spec.caption_field])}"}
            continue
        row = {"key": stem[len(root):], "source": members[image_ext], "image_uri": members[image_ext]}
        if spec.caption_field not in members:
            yield {**row, "reason": "missing_caption", "detail": f"no {stem[len(root):]}.{spec.caption_field} sidecar"}
            continue
        label_uri = members.get(spec.label_key) if spec.label_key else None
        try:
            label = storage.read_bytes(label_uri, max_bytes=1024).decode("utf-8", "replace") if label_uri else None
        except storage.TooLarge as exc:
            yield {**row, "reason": "invalid_label", "detail": str(exc)}
            continue
        except OSError as exc:
            yield _unreadable_sidecar(row, label_uri, exc)
            continue
        metadata, caption = None, {"caption_uri": members[spec.caption_field]}
        if "json" in members:  # held to the per-member limit, as a tar's members are, or the caption's
            document = spec.caption_field == "json"
            try:
                data = storage.read_bytes(members["json"], max_bytes=MAX_CAPTION_DOCUMENT_BYTES if document
                                          else spec.max_image_bytes)
            except storage.TooLarge as exc:
                yield {**row, "reason": "caption_too_long" if document else "unreadable_source",
                       "detail": f"sidecar: {exc}"}
                continue
            except OSError as exc:
                yield _unreadable_sidecar(row, members["json"], exc)
                continue
            metadata = data.decode("utf-8", "replace")
            if document:
                caption = _document_caption(data, f"sidecar {storage.basename(members['json'])}")
                if "reason" in caption:
                    yield {**row, **caption}
                    continue
        yield {**row, **caption, "label": label, "metadata": metadata}


def imagefolder_classes(uri: str) -> list[str]:
    """The classes of a class-per-folder tree (torchvision's ImageFolder, an ImageNet val directory as
    OpenCLIP's --imagenet-val reads it): its subfolders that hold images, sorted; label i is the i-th."""
    return _imagefolder(uri)[1]


def _imagefolder(uri: str, files: list[str] | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """((file URI, its path under `uri`) of every image, the classes), of `files` when the listing is at hand."""
    fs, path = storage.filesystem(uri)
    root = storage.to_uri(fs, path).rstrip("/") + "/"
    names = storage.list_files(uri) if files is None else files
    images = [(name, name[len(root):]) for name in names if name.lower().endswith(_IMAGE_SUFFIXES)]
    return images, sorted({key.partition("/")[0] for _, key in images if "/" in key})


def _read_imagefolder(uri: str, spec: SourceSpec) -> Iterator[dict]:
    """Each image of a class-per-folder tree, labeled by its top folder's place among the sorted classes
    (as ImageFolder numbers them, so line i of a class-names file names label i) and captioned with that
    folder's name."""
    images, classes = _imagefolder(uri)
    index = {name: i for i, name in enumerate(classes)}
    stems = collections.Counter(key.rpartition(".")[0] for _, key in images)
    for name, key in images:
        stem = key.rpartition(".")[0]  # with its extension where another image has the same stem (a.jpg, a.png)
        row = {"key": stem if stems[stem] == 1 else key, "source": name, "image_uri": name}
        top, slash, _ = key.partition("/")
        if not slash:
            yield {**row, "reason": "missing_label", "detail": f"{key} is in no class folder"}
            continue
        yield {**row, "caption": top.encode("utf-8", "surrogatepass"), "label": str(index[top])}


def _unreadable_sidecar(row: dict, uri: str, exc: OSError) -> dict:
    """The reject of one row whose sidecar cannot be read (gone since the listing, no permission, S3's 503):
    raised out of the reader, it ended the folder's rows there, the rest of them never read."""
    return {**row, "reason": "unreadable_source",
            "detail": f"sidecar {storage.basename(uri)}: {type(exc).__name__}: {exc}"[:500]}


def _read_synthetic(uri: str, spec: SourceSpec) -> Iterator[dict]:
    parsed = urlparse(uri)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    start, stop = (int(x) for x in parsed.fragment.split("-"))
    samples = synthetic.samples(stop - start, split=parsed.netloc or "train", seed=int(query.get("seed", 0)),
                                image_size=int(query.get("image_size", 64)), start=start)
    for position, sample in enumerate(samples, start):  # the chunks of one source number its rows as one file
        yield {"key": sample.key, "source": uri.split("#", 1)[0], "position": position, "image": sample.image_bytes(),
               "caption": sample.caption.encode("utf-8"), "label": sample.classname,  # named; see preprocess
               "metadata": json.dumps({"classname": sample.classname})}


_READERS = {"webdataset": _read_webdataset, "parquet": _read_parquet, "csv": _read_csv, "folder": _read_folder,
            "imagefolder": _read_imagefolder, "synthetic": _read_synthetic}
