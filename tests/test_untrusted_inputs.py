"""What the stages read that someone else may have written (a manifest, a shard in a shared bucket): a
crafted one is refused with an error naming it, and a valid one reads as before. Without Ray."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workflows.embed import FORMAT as EMBEDDINGS_FORMAT
from workflows.embed import read_embeddings
from workflows.preprocess import read_prepared_table


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
