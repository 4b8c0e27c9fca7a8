"""workflows.storage without Ray: where remote files are cached locally, and who may have put them there."""

import os
import stat
import tempfile
from pathlib import Path

import pytest

from workflows import storage


@pytest.fixture
def temporary_root(tmp_path, monkeypatch) -> Path:
    """The system's temporary directory, as `tempfile.gettempdir()` answers, moved to a fresh one."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_remote_copies_are_cached_in_a_directory_only_this_user_can_write(temporary_root, tmp_path, s3_bucket):
    (tmp_path / "weights.bin").write_bytes(b"weights")
    uri = f"s3://{s3_bucket}/weights/weights.bin"
    storage.copy(str(tmp_path / "weights.bin"), uri)
    with storage.local_copy(uri) as first:
        private = temporary_root / f"rayclip-{os.getuid()}"
        assert private in Path(first).parents and Path(first).read_bytes() == b"weights"
        status = os.lstat(private)
        assert status.st_uid == os.getuid() and stat.S_IMODE(status.st_mode) & 0o077 == 0
        with storage.local_copy(uri) as second:  # the processes of a node share one download
            assert second == first
    assert not Path(first).exists()


def test_a_reader_killed_inside_neither_pins_its_copy_nor_hides_a_replaced_object(temporary_root, tmp_path,
                                                                                 s3_bucket):
    """A reader SIGKILLed inside local_copy (an OOM kill, `ray job stop`) left its marker, so its copy was
    served for good: after the object was replaced in S3 too, and a checkpoint's worth of disk stayed used."""
    import subprocess
    import sys

    uri = f"s3://{s3_bucket}/weights/weights.bin"
    storage.write_bytes(uri, b"version-1")
    reader = subprocess.run([sys.executable, "-c", f"""
import os, signal
from workflows import storage
with storage.local_copy({uri!r}) as local:
    print(local, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""], capture_output=True, text=True, env={**os.environ, "TMPDIR": str(temporary_root)})
    killed = Path(reader.stdout.strip())
    assert reader.returncode == -9 and killed.read_bytes() == b"version-1"
    storage.write_bytes(uri, b"version-2, replaced")
    with storage.local_copy(uri) as local:
        assert Path(local).read_bytes() == b"version-2, replaced"
        assert not killed.exists(), "the dead reader's copy is deleted"
    copies = temporary_root / f"rayclip-{os.getuid()}" / "copies"
    assert [p.name for folder in copies.iterdir() for p in folder.iterdir()] == ["lock"], "nothing left behind"

    # copies the layout before `copies/` left pinned by a dead reader go too; one a live reader holds stays
    private = temporary_root / f"rayclip-{os.getuid()}"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    for base, pid in (("a" * 20, gone.pid), ("b" * 20, os.getpid())):
        (private / base).mkdir()
        (private / base / "weights.bin").write_bytes(b"old")
        (private / f"{base}.readers").mkdir()
        (private / f"{base}.readers" / f"{pid}-{'0' * 32}").touch()
        (private / f"{base}.lock").touch()
    with storage.local_copy(uri):
        pass
    assert sorted(p.name for p in private.iterdir()) == ["b" * 20, f"{'b' * 20}.lock", f"{'b' * 20}.readers",
                                                         "copies"]


def _plant_writable_by_others(directory: Path) -> None:
    directory.mkdir()
    directory.chmod(0o777)


def _plant_writable_by_group(directory: Path) -> None:
    directory.mkdir()
    directory.chmod(0o770)


def _plant_link(directory: Path) -> None:
    elsewhere = directory.parent / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    directory.symlink_to(elsewhere)


def _plant_file(directory: Path) -> None:
    directory.write_bytes(b"")


@pytest.mark.parametrize("plant", [_plant_writable_by_others, _plant_writable_by_group, _plant_link, _plant_file])
def test_a_cache_directory_someone_else_could_have_filled_is_refused(temporary_root, plant):
    """Another local user who makes our cache directory first, or leaves it writable, could put weights in
    it for us to load (the cache was once /tmp/rayclip-<hash of the URI>, a name anyone could predict)."""
    private = temporary_root / f"rayclip-{os.getuid()}"
    plant(private)
    # refused before anything is read: no S3 server answers for this bucket
    with pytest.raises(PermissionError, match=f"{private} is .*will not read files someone else could have put"):
        with storage.local_copy("s3://no-such-bucket/runs/checkpoint_00000001"):
            pass


def test_a_cache_directory_owned_by_another_user_is_refused(temporary_root, monkeypatch):
    me = os.getuid()
    planted = temporary_root / f"rayclip-{me + 1}"
    planted.mkdir(mode=0o700)  # owned by `me`, as if another user had made it for uid me + 1
    monkeypatch.setattr(os, "getuid", lambda: me + 1)
    with pytest.raises(PermissionError, match=f"is owned by uid {me}, not by this user \\(uid {me + 1}\\)"):
        with storage.local_copy("s3://no-such-bucket/weights/model.safetensors"):
            pass


def test_the_cache_directory_is_made_private_whatever_the_umask(temporary_root):
    previous = os.umask(0)
    try:
        private = storage.private_directory()
    finally:
        os.umask(previous)
    assert private == temporary_root / f"rayclip-{os.getuid()}"
    assert stat.S_IMODE(os.lstat(private).st_mode) == 0o700
    assert storage.private_directory() == private  # found again, accepted


def test_class_names_file_with_a_byte_order_mark_reads_as_the_names(tmp_path):
    """Windows editors save text with a BOM; it must not become part of class 0's name."""
    (tmp_path / "classes.txt").write_bytes(b"\xef\xbb\xbfdog\r\ncat\r\n")
    assert storage.read_lines(str(tmp_path / "classes.txt")) == ["dog", "cat"]


def test_file_uri_of_a_path_with_spaces_and_unicode_reads_the_file(tmp_path):
    """As Path.as_uri() and file managers write them: percent-encoded, with an empty host or localhost."""
    path = tmp_path / "my data #1" / "clâsses.txt"
    path.parent.mkdir()
    path.write_text("dog\ncat\n")
    assert "%20" in path.as_uri()
    for uri in (path.as_uri(), path.as_uri().replace("file://", "file://localhost", 1)):
        assert storage.read_lines(uri) == ["dog", "cat"]
        assert storage.absolute(uri) == str(path)
    with pytest.raises(storage.UnsupportedURI, match="file://server/share/c.txt names the host 'server'"):
        storage.read_lines("file://server/share/c.txt")


def test_a_name_that_is_not_utf8_fails_the_listing_naming_it_and_how_to_rename(tmp_path):
    # archives unpacked from Windows: pyarrow's listing raised a bare UnicodeDecodeError naming nothing
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "fine.jpg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path / "cls"), b"caf\xe9.jpg"), "wb") as file:
        file.write(b"x")
    with pytest.raises(ValueError, match=rf"{tmp_path} holds a file or folder whose name is not UTF-8 "
                                         rf"\('{tmp_path}/cls/caf\\xe9.jpg'\).*rename it \(convmv"):
        storage.list_files(str(tmp_path))
