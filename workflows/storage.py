"""One way to reach local paths and s3:// URIs alike, through pyarrow's filesystems.

S3 settings come from the standard AWS environment and profile (credentials, region), plus
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for S3-compatible servers, which boto3 honours and
pyarrow does not on its own (apache/arrow#49643): they are passed to pyarrow here.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import os
import posixpath
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs


class UnsupportedURI(ValueError):
    """A URI this project does not read: anything but a local path, file:// and s3://."""


class TooLarge(ValueError):
    """An object over the size limit its reader set."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    options: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    if region:
        options["region"] = region
    return pafs.S3FileSystem(**options)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path, file:// URI or s3://bucket/key."""
    uri = str(uri)
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3_filesystem(s3_endpoint(), region), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        return pafs.LocalFileSystem(), os.path.abspath(_file_path(uri))
    if "://" in uri:
        raise UnsupportedURI(f"unsupported URI scheme in {uri!r}: rayclip reads local paths, file:// and s3:// and "
                             "never downloads at run time")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def _file_path(uri: str) -> str:
    """The local path of a file:// URI, percent-decoded as `Path.as_uri()` and file managers encode it; a '?'
    or '#' is part of the path (such URIs are often a path pasted after file://). Refused on another host."""
    host, _, path = uri[len("file://"):].partition("/")
    if host not in ("", "localhost"):
        raise UnsupportedURI(f"{uri} names the host {host!r}: rayclip reads this machine's files only, as "
                             "file:///path or file://localhost/path")
    return "/" + unquote(path)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://"):].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def join_listed(uri: str, path: str, manifest: str) -> str:
    """`uri` joined with `path`, a file that the manifest at `manifest` lists under `uri`; refused (ValueError)
    unless `path` is relative and stays inside `uri`: no scheme, no leading "/", no "..", "." or empty part.
    A manifest may come from a bucket others write to: it must not lead a reader to /etc/… or ../other-team/…"""
    parts = path.split("/") if isinstance(path, str) else None
    if parts is None or "://" in path or any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"{manifest} lists the file {path!r}, which is not a relative path inside {uri} (no scheme, "
                         "leading '/', '..', '.' or empty part): a manifest names files of its own directory only")
    return join(uri, *parts)


def absolute(uri: str) -> str:
    """A local path as an absolute path against this process's directory, `~` expanded (Ray's workers run
    elsewhere), a file:// URI as its path; any other URI (s3://, synthetic://) as it is."""
    if uri.startswith("file://"):
        return os.path.abspath(_file_path(uri))
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def dirname(uri: str) -> str:
    uri = str(uri)
    if is_s3(uri):
        return "s3://" + posixpath.dirname(uri[len("s3://"):].rstrip("/"))
    return os.path.dirname(os.path.abspath(uri))


def basename(uri: str) -> str:
    return posixpath.basename(str(uri).rstrip("/"))


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    return fs.get_file_info(path)


def exists(uri: str) -> bool:
    return info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return info(uri).type == pafs.FileType.Directory


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The whole object; with `max_bytes`, refuse (TooLarge) anything larger instead of reading it."""
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as stream:
        if max_bytes is None:
            return stream.read()
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TooLarge(f"{uri} is larger than the limit of {max_bytes:,} bytes")
    return data


def read_lines(uri: str, max_bytes: int = 16 * 2**20) -> list[str]:
    """One entry per line (class names, prompt templates); a blank line between entries is an error,
    since an entry's line number can be its label. A leading BOM (Windows editors write one) is dropped."""
    text = read_bytes(uri, max_bytes=max_bytes).decode("utf-8-sig")
    lines = [line.strip() for line in text.rstrip().splitlines()]
    if "" in lines:
        raise ValueError(f"{uri}, line {lines.index('') + 1}: blank line; write one entry per line, no blank lines "
                         "between them (a class name's line number is its label)")
    return lines


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` without ever showing a partial object there (see `upload`)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    _replace_locally(path, lambda temporary: Path(temporary).write_bytes(data))


def copy(source: str, destination: str) -> None:
    """Copy the file at `source` to `destination` (each a local path or s3:// URI), streamed, never held
    whole in memory, and without ever showing a partial object there: an S3 upload appears whole when it
    completes; locally, the copy goes to a temporary name renamed over the target."""
    source_fs, source_path = filesystem(source)
    fs, path = filesystem(destination)

    def write(target: str) -> None:
        pafs.copy_files(source_path, target, source_filesystem=source_fs, destination_filesystem=fs)

    if isinstance(fs, pafs.S3FileSystem):
        fs.create_dir(posixpath.dirname(path), recursive=True)
        write(path)
        return
    _replace_locally(path, write)


def copy_directory(source: str, destination: str, last: str | None = None) -> None:
    """Copy every file under `source` to the same path under `destination` (each a local path or s3://
    URI), the file named `last` after the others: its presence then says the copy is whole."""
    if source == destination:
        return
    for uri in sorted(list_files(source), key=lambda uri: basename(uri) == last):
        copy(uri, join(destination, uri[len(source):].lstrip("/")))


def _replace_locally(path: str, write: Callable[[str], object]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def download(uri: str, local_dir: str) -> str:
    """Copy the file or directory at `uri` into `local_dir`; returns its local path."""
    fs, path = filesystem(uri)
    local = os.path.join(local_dir, posixpath.basename(path))
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        os.makedirs(local, exist_ok=True)  # copying out of S3 does not create it
    pafs.copy_files(path, local, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def private_directory() -> Path:
    """This user's directory for the downloads its processes share (`local_copy`), under the system's
    temporary directory: made with mode 0o700, and refused (PermissionError) unless it is a directory
    (not a link) that this user owns and no one else may write. The temporary directory is shared by
    every local user: one who made it first could otherwise plant files there for us to load."""
    directory = Path(tempfile.gettempdir()) / f"rayclip-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    check_private(directory)
    return directory


def check_private(directory: str | os.PathLike) -> None:
    """Refuse (PermissionError) `directory` unless it is a real directory owned by this user that neither
    its group nor others may write: files in it can then only have come from this user."""
    status = os.lstat(directory)
    problem = None
    if not stat.S_ISDIR(status.st_mode):
        problem = "is not a directory (a link or a file)"
    elif status.st_uid != os.getuid():
        problem = f"is owned by uid {status.st_uid}, not by this user (uid {os.getuid()})"
    elif status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"is writable by its group or others (mode {stat.S_IMODE(status.st_mode):o})"
    if problem:
        raise PermissionError(f"{directory} {problem}: rayclip keeps its downloads there and will not read files "
                              "someone else could have put there; remove it (rayclip makes it afresh, mode 700) or "
                              "set TMPDIR to a directory of your own")


@contextlib.contextmanager
def local_copy(uri: str):
    """A local path to read `uri` from: a local path as it is; an s3:// file or directory downloaded once
    per machine for all the processes reading it at the same time (the workers of a node resuming from a
    checkpoint), and deleted when the last of them is done.

    Ray's `Checkpoint.as_directory` does this too, but a process that comes after its download finished
    downloads again into the same directory, over the files the others are reading (on resume from S3
    that tore train_state.pt and crashed a worker in the memory-mapped weights). Here a download lands
    whole (a rename) and is never repeated while anyone reads it. A copy is named by the object's version
    (its files' sizes and modification times), so one replaced in S3 is downloaded afresh; a reader that
    dies inside is pruned by the next call for `uri`, which deletes the copies no live process reads. A
    copy is shared only by the processes of one user, in its `private_directory` (Ray's workers run as the
    user who started Ray)."""
    if not is_s3(uri):
        yield uri
        return
    private = private_directory()
    _prune_legacy(private)
    folder = private / "copies" / hashlib.sha256(uri.encode()).hexdigest()[:20]
    folder.mkdir(parents=True, exist_ok=True)
    version = _version(uri)
    done, partial, readers = folder / version, folder / f"{version}.partial", folder / f"{version}.readers"

    @contextlib.contextmanager
    def locked():
        with open(folder / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            yield

    me = readers / f"{os.getpid()}-{uuid.uuid4().hex}"
    with locked():
        _prune(folder, keep=version)
        if not done.exists():
            shutil.rmtree(partial, ignore_errors=True)  # what a download that died left
            partial.mkdir()
            download(uri, str(partial))
            partial.rename(done)
        readers.mkdir(exist_ok=True)
        me.touch()
    try:
        yield str(done / posixpath.basename(filesystem(uri)[1]))
    finally:
        with locked():
            me.unlink()
            _prune(folder)


def _version(uri: str) -> str:
    """What tells one content of the file or directory at `uri` from another: its files' paths, sizes and
    modification times (a listing, not a read)."""
    fs, path = filesystem(uri)
    listed = fs.get_file_info(path)
    if listed.type == pafs.FileType.Directory:
        listed = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    stamps = sorted((i.path, i.size, i.mtime_ns) for i in (listed if isinstance(listed, list) else [listed])
                    if i.type == pafs.FileType.File)
    return hashlib.sha256(repr(stamps).encode()).hexdigest()[:20]


def _prune(folder: Path, keep: str | None = None) -> None:
    """Under `folder`'s lock: forget the readers whose process is gone, and delete every copy (but `keep`)
    that no live process reads, and downloads that died half way."""
    for entry in folder.iterdir():
        if entry.name.endswith(".readers"):
            for marker in entry.iterdir():
                if not _alive(marker):
                    marker.unlink()
    for entry in folder.iterdir():
        version, _, suffix = entry.name.partition(".")
        if entry.name == "lock" or version == keep or \
                suffix in ("", "readers") and _has_readers(folder / f"{version}.readers"):
            continue
        shutil.rmtree(entry, ignore_errors=True)


_LEGACY_READERS = re.compile(r"[0-9a-f]{20}\.readers")


def _prune_legacy(private: Path) -> None:
    """The copies of the layout before `copies/` (the URI's hash in `private` itself), which a reader killed
    inside pinned for good: deleted once no reader of theirs lives."""
    for readers in private.glob("*.readers"):
        if _LEGACY_READERS.fullmatch(readers.name) and not any(_alive(marker) for marker in readers.iterdir()):
            base = readers.name.removesuffix(".readers")
            for name in (base, f"{base}.partial", readers.name):
                shutil.rmtree(private / name, ignore_errors=True)
            (private / f"{base}.lock").unlink(missing_ok=True)


def _has_readers(readers: Path) -> bool:
    return readers.is_dir() and any(readers.iterdir())


def _alive(marker: Path) -> bool:
    """Whether the process that left reader `marker` (named PID-UUID) still runs."""
    try:
        os.kill(int(marker.name.partition("-")[0]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: alive
        return True
    return True


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """Files under a directory/prefix (sorted), optionally only those ending in `suffixes`."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=False)
    try:
        names = [i.path for i in fs.get_file_info(selector) if i.type == pafs.FileType.File]
    except UnicodeDecodeError:  # pyarrow's local listing, at a name not in UTF-8
        raise ValueError(f"{uri} holds a file or folder whose name is not UTF-8 ({_undecodable(path)}), which "
                         "cannot be listed: rename it (convmv -f latin1 -t utf8 -r --notest DIR)") from None
    if suffixes:
        names = [n for n in names if n.lower().endswith(suffixes)]
    return sorted(to_uri(fs, n) for n in names)


def _undecodable(path: str) -> str:
    """The first name under local `path` that is not UTF-8, as Python shows it."""
    for folder, directories, files in os.walk(os.fsencode(path)):
        for name in directories + files:
            try:
                name.decode("utf-8")
            except UnicodeDecodeError:
                return repr(os.path.join(folder, name))[1:]
    return "not found again"


def read_parquet(uris: list[str], columns: list[str] | None = None, filters=None):
    """The Parquet files at `uris` (local or s3://) as one pyarrow Table, in order; without Ray; only
    the rows `filters` (pyarrow's, e.g. `[("key", "in", keys)]`) keep."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    for uri in uris:
        fs, path = filesystem(uri)
        with fs.open_input_file(path) as f:
            tables.append(pq.read_table(f, columns=columns, filters=filters))
    return pa.concat_tables(tables)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    found = fs.get_file_info(path).type
    if found == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif found == pafs.FileType.File:
        fs.delete_file(path)


_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """`shard-{00000..00099}.tar` → the 100 names, zero-padding kept; several ranges multiply."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    low, high = match.group(1), match.group(2)
    if int(high) < int(low):
        raise ValueError(f"brace range {match.group(0)} in {pattern!r} runs backwards")
    width = len(low) if low.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [name for i in range(int(low), int(high) + 1) for name in expand_braces(f"{head}{i:0{width}d}{tail}")]
