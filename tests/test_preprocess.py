"""The preprocess stage on a real local Ray and a real S3 server (moto on 127.0.0.1)."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import corpus
from workflows import cli
from workflows import preprocess as stage
from workflows.preprocess import PreprocessOptions, load_prepared, preprocess, read_manifest
from workflows.sources import SourceError

pytestmark = pytest.mark.usefixtures("ray_session")


def _quiet(*_):
    pass


def _shard_rows(output) -> list[dict]:
    manifest = read_manifest(str(output))
    rows = []
    for shard in manifest["shards"]:
        rows += pq.read_table(Path(output) / shard["path"]).to_pylist()
    return rows


def _rejects(output) -> dict[str, str]:
    return {r["key"]: r["reason"] for r in pq.read_table(Path(output) / "rejects.parquet").to_pylist()}


def test_bad_input_corpus_every_row_is_kept_or_rejected_with_its_reason(tmp_path):
    expected = corpus.write_bad_webdataset(tmp_path / "src")
    lines = []
    manifest = preprocess(str(tmp_path / "src"), str(tmp_path / "out"),
                          PreprocessOptions(image_size=48, min_caption_chars=3, rows_per_shard=8, batch_size=4,
                                            progress_interval_s=0.02), echo=lines.append)

    counts = manifest["counts"]
    assert counts["read"] == len(expected) == counts["kept"] + counts["rejected"]
    assert _rejects(tmp_path / "out") == {key: reason for key, reason in expected.items() if reason}
    source_of = {r["key"]: r["source"] for r in pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()}
    assert source_of["shard-00000.tar:corrupt-jpeg"] == str(tmp_path / "src" / "shard-00000.tar")
    assert source_of["shard-00001.tar:no-image"] == str(tmp_path / "src" / "shard-00001.tar")
    assert source_of["shard-00002.tar#unreadable"] == str(tmp_path / "src" / "shard-00002.tar")
    kept = _shard_rows(tmp_path / "out")
    assert sorted(r["key"] for r in kept) == sorted(key for key, reason in expected.items() if reason is None)
    assert sum(counts["rejected_by_reason"].values()) == counts["rejected"]
    for row in kept:
        image = Image.open(io.BytesIO(row["image"]))
        assert image.size == (48, 48) and image.mode == "RGB"
        assert row["tokens"][0] == 49406 and row["tokens"][-1] == 49407 and len(row["tokens"]) <= 77
    assert json.loads(next(r for r in kept if r["key"] == "shard-00000.tar:ok-jpeg")["metadata"]) == {"url": "x"}
    for shard in manifest["shards"]:
        assert hashlib.sha256((tmp_path / "out" / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
        # a shard holds the rows kept out of at most rows_per_shard read: rejects make it smaller, never larger
        assert pq.read_metadata(tmp_path / "out" / shard["path"]).num_rows == shard["rows"] <= 8
    # progress lines arrive while rows are processed, not only when shards complete
    progress = [tuple(int(n.replace(",", "")) for n in match.groups()) for line in lines
                if (match := re.match(r"  ([\d,]+) rows processed, ([\d,]+) rejected before deduplication \(", line))]
    assert progress == sorted(progress) and 0 < progress[-1][0] <= counts["read"], lines
    assert progress[-1][1] <= counts["rejected"]
    assert manifest["image_size"] == 48 and manifest["tokenizer"]["id"] == "clip-bpe-49408"
    assert manifest["digest"].startswith("sha256:") and manifest["sources"] == [str(tmp_path / "src")]


def test_each_format_reads_locally(tmp_path):
    pairs = corpus.clean_pairs(12)  # about 5 kB each
    heavy = ("heavy", corpus.encode(corpus.photo(400, 400, seed=99)), "a photo of too many bytes")  # about 97 kB
    corpus.write_webdataset(tmp_path / "wds", pairs, shards=3)
    corpus.write_parquet(tmp_path / "pq" / "part-0.parquet",
                         [*pairs, heavy, ("no-image", None, "a caption"), ("no-caption", pairs[0][1], None)])
    csv_path = corpus.write_csv(tmp_path / "csv", pairs)
    # image cells: relative paths, absolute paths and file:// URIs are read; other schemes are never fetched
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].replace("images/", f"file://{tmp_path}/csv/images/")
    lines[2] = lines[2].replace("images/", f"{tmp_path}/csv/images/")
    # a 200 kB caption is that row's reject (csv's own cell limit, 128 KiB, failed the rest of the file)
    csv_path.write_text("\n".join([*lines[:3], f"images/{pairs[0][0]}.jpg,{'word ' * 40_000}", *lines[3:],
                                   "http://example.com/a.jpg,a photo on the web",
                                   "https://example.com/b.jpg,another photo on the web"]) + "\n")
    tsv_path = corpus.write_csv(tmp_path / "tsv", pairs, delimiter="\t")
    # a TSV quoted as pandas writes it (OpenCLIP's): a quote doubled inside a quoted cell, a line break kept
    lines = tsv_path.read_text().splitlines()
    (tmp_path / "tsv" / "images" / "quote.jpg").write_bytes(corpus.encode(corpus.photo(60, 60, seed=123)))
    tsv_path.write_text("\n".join([*lines[:2], 'images/quote.jpg\t"the ""six inch""\nfigurine"', *lines[2:]]) + "\n")
    # OpenCLIP's .csv: tab-separated, its --csv-separator default
    openclip_csv = tmp_path / "openclip" / "pairs.csv"
    corpus.write_csv(tmp_path / "openclip", pairs, delimiter="\t").rename(openclip_csv)
    corpus.write_folder(tmp_path / "folder", [*pairs, heavy])
    (tmp_path / "folder" / "orphan.jpg").write_bytes(pairs[0][1])  # no sidecar caption
    (tmp_path / "folder" / "lonely.txt").write_text("a caption whose image is missing")
    (tmp_path / "folder" / f"{pairs[0][0]}.json").write_text('{"url": "https://example.com/0.jpg"}')  # img2dataset's

    runs = {
        "webdataset": (str(tmp_path / "wds" / "shard-{00000..00002}.tar"), {}),
        "parquet": (str(tmp_path / "pq"), {"image_key": "jpg", "caption_key": "txt", "max_image_bytes": 50_000}),
        "csv": (str(csv_path), {"caption_key": "title"}),
        "tsv": (str(tsv_path), {"caption_key": "title"}),
        "openclip-csv": (str(openclip_csv), {"caption_key": "title", "csv_separator": "\t"}),
        "folder": (str(tmp_path / "folder"), {"max_image_bytes": 50_000}),
    }
    captions = sorted(caption for _, _, caption in pairs)
    for name, (source, options) in runs.items():
        manifest = preprocess(source, str(tmp_path / f"out-{name}"), PreprocessOptions(image_size=32, **options),
                              echo=_quiet)
        rows = _shard_rows(tmp_path / f"out-{name}")
        expected = sorted([*captions, 'the "six inch" figurine']) if name == "tsv" else captions
        assert sorted(r["caption"] for r in rows) == expected, name
        expected_read = {"parquet": 15, "csv": 15, "tsv": 13, "folder": 15}.get(name, 12)
        assert manifest["counts"]["read"] == expected_read, name
    # a Parquet file's own key column, with its file (as a WebDataset sample's key, with its tar)
    assert _rejects(tmp_path / "out-parquet") == {"part-0.parquet:heavy": "image_too_large",
                                                  "part-0.parquet:no-image": "missing_image",
                                                  "part-0.parquet:no-caption": "missing_caption"}
    assert _rejects(tmp_path / "out-csv") == {"pairs.csv:2": "caption_too_long", "pairs.csv:13": "unsupported_uri",
                                              "pairs.csv:14": "unsupported_uri"}
    assert _rejects(tmp_path / "out-folder") == {"orphan": "missing_caption", "lonely": "missing_image",
                                                 "heavy": "image_too_large"}
    metadata = {r["key"]: r["metadata"] for r in _shard_rows(tmp_path / "out-folder")}
    assert json.loads(metadata.pop(pairs[0][0])) == {"url": "https://example.com/0.jpg"}
    assert set(metadata.values()) == {None}, "a sidecar .json is passed through as the row's metadata"


def test_each_row_has_its_own_key_and_relative_paths_read(tmp_path, monkeypatch):
    """Two partitions' files of one name: a row's key is its file's path in the source (not its name,
    which let the second partition's copy of an image past deduplication as the same row)."""
    pairs = corpus.clean_pairs(2)
    for year in (2023, 2024):  # the same images in both
        (tmp_path / "pq" / f"year={year}").mkdir(parents=True)
        pq.write_table(pa.table({"image": [p[1] for p in pairs], "caption": [p[2] for p in pairs]}),
                       tmp_path / "pq" / f"year={year}" / "part-0.parquet")
    corpus.write_folder(tmp_path / "folder", pairs)
    monkeypatch.chdir(tmp_path)  # as `rayclip preprocess pq out` is typed
    manifest = preprocess("pq", "out-pq", PreprocessOptions(image_size=32), echo=_quiet)
    assert manifest["counts"]["kept"] == 2
    assert sorted(r["key"] for r in _shard_rows(tmp_path / "out-pq")) == ["year=2023/part-0.parquet:0",
                                                                          "year=2023/part-0.parquet:1"]
    assert _rejects(tmp_path / "out-pq") == {"year=2024/part-0.parquet:0": "duplicate",
                                             "year=2024/part-0.parquet:1": "duplicate"}
    preprocess("folder", "out-folder", PreprocessOptions(image_size=32), echo=_quiet)
    assert sorted(r["key"] for r in _shard_rows(tmp_path / "out-folder")) == sorted(p[0] for p in pairs)


def test_every_caption_of_an_image_is_kept_and_only_an_exact_repeat_is_dropped(tmp_path):
    """COCO's layout (one row per caption) in two tars that each number their samples from 000, one of them
    holding a sample twice under the same key: through the whole stream, a row's place in its file (not its
    key) tells a repeat from a retried batch."""
    cat, dog = (corpus.encode(corpus.photo(64, 64, seed=seed)) for seed in (1, 2))
    (tmp_path / "src").mkdir()
    corpus.write_tar(tmp_path / "src" / "a.tar", [
        ("000.jpg", cat), ("000.txt", b"a cat"), ("001.jpg", cat), ("001.txt", b"a cat on a mat"),
        ("002.jpg", dog), ("002.txt", b"a dog"), ("000.jpg", cat), ("000.txt", b"a  cat")])
    corpus.write_tar(tmp_path / "src" / "b.tar", [("000.jpg", dog), ("000.txt", b"a dog, again")])
    manifest = preprocess(str(tmp_path / "src"), str(tmp_path / "out"),
                          PreprocessOptions(image_size=32, batch_size=2, rows_per_shard=2), echo=_quiet)
    assert manifest["counts"]["read"] == 5 and manifest["counts"]["rejected_by_reason"] == {"duplicate": 1}
    assert sorted((r["key"], r["caption"]) for r in _shard_rows(tmp_path / "out")) == [
        ("a.tar:000", "a cat"), ("a.tar:001", "a cat on a mat"), ("a.tar:002", "a dog"), ("b.tar:000", "a dog, again")]
    (reject,) = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert (reject["key"], reject["reason"]) == ("a.tar:000#2", "duplicate")  # its second run of members
    assert reject["detail"] == f"same pixels and caption as row 0 of {tmp_path / 'src' / 'a.tar'} (counting from 0)"


def test_labeled_sets_map_labels_through_class_names_in_every_format(tmp_path, capsys):
    pairs = corpus.clean_pairs(6, seed=3)
    labels = ["cat", "dog", "1", "bird", "7", ""]  # names, an index, an unknown name, an index out of range, none
    corpus.write_parquet(tmp_path / "eval.parquet", pairs, labels=labels)
    corpus.write_webdataset(tmp_path / "wds", pairs, shards=2, labels=labels)
    corpus.write_csv(tmp_path / "csv", pairs, labels=labels)
    corpus.write_folder(tmp_path / "folder", pairs, labels=labels)
    (tmp_path / "folder" / f"{pairs[0][0]}.cls").write_text("cat" * 400)  # a sidecar over the 1 KiB label limit
    (tmp_path / "classnames.txt").write_text("cat\ndog\n")
    sources = {"parquet": (tmp_path / "eval.parquet", ["--image-key", "jpg", "--caption-key", "txt"]),
               "webdataset": (tmp_path / "wds", []),
               "csv": (tmp_path / "csv" / "pairs.csv", ["--caption-key", "title"]),
               "folder": (tmp_path / "folder", [])}
    for name, (source, flags) in sources.items():
        label_key = "cls" if name in ("webdataset", "folder") else "label"
        # names as labels with nothing to map them through fail before the run, not as every row rejected
        assert cli.main(["preprocess", str(source), str(tmp_path / "unmapped"), *flags, "--label-key", label_key]) == 2
        error = capsys.readouterr().err
        assert re.search(r"the labels in .* are class names \('.*'dog'.*\), but no class names were given .*"
                         r"pass --classnames FILE", error), (name, error)
        assert not (tmp_path / "unmapped").exists()
        # the command line, as users run it: --label-key and a class-names file
        assert cli.main(["preprocess", str(source), str(tmp_path / f"out-{name}"), "--image-size", "32",
                         *flags, "--label-key", label_key, "--classnames", str(tmp_path / "classnames.txt")]) == 0
        output = tmp_path / f"out-{name}"
        # a CSV row's key is its line, a tar's sample's is its key in the tar, a Parquet row's its key column's
        # with its file; a folder keeps the sample's name
        keys = ([f"pairs.csv:{i}" for i in range(len(pairs))] if name == "csv" else
                [f"shard-{i // 3:05d}.tar:{key}" for i, (key, _, _) in enumerate(pairs)] if name == "webdataset" else
                [f"eval.parquet:{key}" for key, _, _ in pairs] if name == "parquet" else
                [key for key, _, _ in pairs])
        expected_labels = {keys[0]: 0, keys[1]: 1, keys[2]: 1}
        expected_rejects = {keys[3]: "invalid_label", keys[4]: "invalid_label", keys[5]: "missing_label"}
        if name == "folder":
            expected_rejects[keys[0]] = "invalid_label"
            del expected_labels[keys[0]]
        assert {r["key"]: r["label"] for r in _shard_rows(output)} == expected_labels, name
        assert _rejects(output) == expected_rejects, name
        assert read_manifest(str(output))["classnames"] == ["cat", "dog"], name

    # indices need no class names
    corpus.write_parquet(tmp_path / "indexed.parquet", pairs[:3], labels=["0", "3", "2"])
    preprocess(str(tmp_path / "indexed.parquet"), str(tmp_path / "out-indexed"),
               PreprocessOptions(image_key="jpg", caption_key="txt", label_key="label", image_size=32), echo=_quiet)
    assert sorted(r["label"] for r in _shard_rows(tmp_path / "out-indexed")) == [0, 2, 3]
    # what only looks like an index is refused, not a crash
    corpus.write_parquet(tmp_path / "odd.parquet", pairs, labels=["0", "1", "dog", "--5", "²", "9" * 20])
    preprocess(str(tmp_path / "odd.parquet"), str(tmp_path / "out-odd"),
               PreprocessOptions(image_key="jpg", caption_key="txt", label_key="label", image_size=32,
                                 classnames=["cat", "dog"]), echo=_quiet)
    assert sorted(r["label"] for r in _shard_rows(tmp_path / "out-odd")) == [0, 1, 1]
    assert _rejects(tmp_path / "out-odd") == {f"odd.parquet:{key}": "invalid_label" for key, _, _ in pairs[3:]}
    # integer labels in a float column (pandas writes ints beside a missing value as floats)
    table = pa.table({"jpg": [p[1] for p in pairs[:3]], "txt": [p[2] for p in pairs[:3]], "label": [1.0, 0.0, None]})
    pq.write_table(table, tmp_path / "floats.parquet")
    preprocess(str(tmp_path / "floats.parquet"), str(tmp_path / "out-floats"),
               PreprocessOptions(image_key="jpg", caption_key="txt", label_key="label", image_size=32,
                                 classnames=["cat", "dog"]), echo=_quiet)
    assert sorted(r["label"] for r in _shard_rows(tmp_path / "out-floats")) == [0, 1]


def test_synthetic_source_carries_labels_and_class_names(tmp_path):
    manifest = preprocess("synthetic://heldout?count=40&seed=3&image_size=32", str(tmp_path / "out"),
                          PreprocessOptions(image_size=32, dedupe=False), echo=_quiet)
    assert manifest["counts"] == {"read": 40, "kept": 40, "rejected": 0, "rejected_by_reason": {}}
    rows = _shard_rows(tmp_path / "out")
    for row in rows:
        classname = manifest["classnames"][row["label"]]
        assert json.loads(row["metadata"])["classname"] == classname
        assert all(word in row["caption"] for word in classname.split())


def test_s3_in_and_out(tmp_path, s3_bucket):
    s3 = boto3.client("s3")
    pairs = corpus.clean_pairs(8, seed=5)
    corpus.write_webdataset(tmp_path / "wds", pairs, shards=2)
    corpus.write_parquet(tmp_path / "pq" / "data.parquet", pairs)
    csv_path = corpus.write_csv(tmp_path / "csv", pairs)
    lines = csv_path.read_text().splitlines()
    lines[1] = lines[1].replace("images/", f"s3://{s3_bucket}/raw/csv/images/")  # an absolute URI in a cell
    csv_path.write_text("\n".join(lines) + "\n")
    corpus.write_folder(tmp_path / "folder", pairs)
    # a labeled TSV whose last label is out of range: its reject lands in rejects.parquet on S3
    tsv_path = corpus.write_csv(tmp_path / "tsv", pairs, delimiter="\t", labels=["0", "1"] * 3 + ["1", "2"])
    for path in [*tmp_path.glob("wds/*.tar"), tmp_path / "pq" / "data.parquet", csv_path, tsv_path,
                 *tmp_path.glob("csv/images/*.jpg"), *tmp_path.glob("tsv/images/*.jpg"), *tmp_path.glob("folder/*")]:
        s3.upload_file(str(path), s3_bucket, f"raw/{path.relative_to(tmp_path)}")

    runs = {"wds": (f"s3://{s3_bucket}/raw/wds", {}),
            "pq": (f"s3://{s3_bucket}/raw/pq/data.parquet", {"image_key": "jpg", "caption_key": "txt"}),
            "csv": (f"s3://{s3_bucket}/raw/csv/pairs.csv", {"caption_key": "title"}),
            "folder": (f"s3://{s3_bucket}/raw/folder", {"format": "folder"}),
            "tsv": (f"s3://{s3_bucket}/raw/tsv/pairs.tsv", {"caption_key": "title", "label_key": "label",
                                                            "classnames": ["even", "odd"]})}
    digests = {}
    for name, (source, options) in runs.items():
        output = f"s3://{s3_bucket}/prepared/{name}"
        manifest = preprocess(source, output, PreprocessOptions(image_size=32, rows_per_shard=5, **options),
                              echo=_quiet)
        kept = 7 if name == "tsv" else 8
        assert manifest["counts"]["kept"] == kept, name
        stored = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"prepared/{name}/manifest.json")["Body"].read())
        assert stored["digest"] == manifest["digest"]
        for entry in [*stored["shards"], stored["rejects"]]:
            body = s3.get_object(Bucket=s3_bucket, Key=f"prepared/{name}/{entry['path']}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == entry["sha256"]
        rejects = pq.read_table(io.BytesIO(body)).to_pylist()  # the last entry: rejects.parquet
        assert [(r["key"], r["reason"]) for r in rejects] == ([("pairs.tsv:7", "invalid_label")] if name == "tsv"
                                                              else []), name
        assert load_prepared(output).count() == kept
        digests[name] = manifest["digest"]
    # the digest is the content, keys among it: the same pixels and captions keyed by name (a folder), with
    # their Parquet file or their tar, or by their CSV line are four datasets
    assert len({digests[name] for name in ("folder", "pq", "csv", "wds")}) == 4


def test_prepared_rows_feed_torch_batches_shuffled_by_seed(tmp_path):
    import torch

    from workflows.preprocess import decode_batch
    from workflows.train_data import Augment

    manifest = preprocess("synthetic://all?count=24&seed=4&image_size=48", str(tmp_path / "out"),
                          PreprocessOptions(image_size=48, rows_per_shard=4), echo=_quiet)
    assert len(manifest["shards"]) == 6

    def torch_batches(seed: int) -> list[dict]:
        dataset = load_prepared(str(tmp_path / "out"), shuffle_files=True, seed=seed)
        dataset = dataset.map_batches(decode_batch, batch_format="numpy", fn_kwargs={"image_size": 32})
        dataset.context.execution_options.preserve_order = True  # as the trainer's DataConfig sets it
        return list(dataset.iter_torch_batches(batch_size=10, local_shuffle_buffer_size=16, local_shuffle_seed=0))

    batches = torch_batches(seed=0)
    augment = Augment(32, train=True, generator=torch.Generator().manual_seed(0))
    images = augment(batches[0]["image"])
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.float32
    tokens = batches[0]["tokens"]
    assert tokens.shape == (10, 77) and (tokens[:, 0] == 49406).all() and (tokens.argmax(dim=1) > 0).all()
    assert batches[0]["label"].shape == (10,) and sum(len(b["tokens"]) for b in batches) == 24
    assert not torch.equal(augment(batches[0]["image"]), images), "two draws of the random crop differ"

    def order(batches: list[dict]) -> torch.Tensor:  # every row's pixels differ
        return torch.cat([b["image"] for b in batches])

    assert torch.equal(order(torch_batches(seed=0)), order(batches)), "the same seed, the same order"
    assert not torch.equal(order(torch_batches(seed=1)), order(batches)), "another file order for another seed"


def test_a_source_sorted_by_class_is_stored_mixed_unless_told_to_keep_its_order(tmp_path):
    # an evaluation set or a crawl is often sorted (by class, by site): shards written in that
    # order, read through a few hundred rows of shuffle buffer, give training batches of one class
    pairs = corpus.clean_pairs(160, seed=5)
    corpus.write_parquet(tmp_path / "sorted.parquet", pairs, labels=[str(i // 40) for i in range(160)])

    def stored_labels(name: str, **options) -> list[list[int]]:
        preprocess(str(tmp_path / "sorted.parquet"), str(tmp_path / name),
                   PreprocessOptions(image_key="jpg", caption_key="txt", label_key="label", image_size=32,
                                     rows_per_shard=40, batch_size=16, **options), echo=_quiet)
        manifest = read_manifest(str(tmp_path / name))
        return [pq.read_table(tmp_path / name / s["path"]).column("label").to_pylist() for s in manifest["shards"]]

    in_order = stored_labels("kept-order", shuffle=False)
    assert [label for shard in in_order for label in shard] == [i // 40 for i in range(160)]

    mixed = stored_labels("mixed")
    assert sorted(label for shard in mixed for label in shard) == [i // 40 for i in range(160)], "no row lost"
    assert [len(shard) for shard in mixed] == [40] * 4, "rows_per_shard rows a shard, none left over in a small one"
    assert all(len(set(shard)) == 4 for shard in mixed), mixed
    stream = [label for shard in mixed for label in shard]
    repeats = sum(a == b for a, b in zip(stream, stream[1:])) / (len(stream) - 1)
    assert repeats < 0.45, f"{repeats:.0%} of neighbours share a class (about 25% when shuffled, 98% sorted)"
    assert stored_labels("mixed-again") == mixed, "the shuffle is seeded: a rerun writes the same shards"

    # what the train stage reads: the first batches of 16 hold several classes, not one
    batches = load_prepared(str(tmp_path / "mixed"), shuffle_files=True, seed=0).iter_batches(batch_size=16)
    assert all(len(set(batch["label"].tolist())) >= 2 for batch, _ in zip(batches, range(4)))


def _files_disagreeing_with_manifest(output: Path) -> list[str]:
    if not (output / "manifest.json").exists():
        return []
    manifest = read_manifest(str(output))
    named = [*manifest["shards"], manifest["rejects"]]
    return [entry["path"] for entry in named if not (output / entry["path"]).exists()
            or hashlib.sha256((output / entry["path"]).read_bytes()).hexdigest() != entry["sha256"]]


def test_same_input_same_digest_and_reruns_are_safe(tmp_path, monkeypatch):
    source = "synthetic://train?count=120&seed=9&image_size=32"
    first = preprocess(source, str(tmp_path / "a"), PreprocessOptions(image_size=32, rows_per_shard=50), echo=_quiet)
    other = preprocess(source, str(tmp_path / "b"), PreprocessOptions(image_size=32, rows_per_shard=30), echo=_quiet)
    assert first["digest"] == other["digest"], "the digest is the rows' content, not their sharding"
    assert len(first["shards"]) != len(other["shards"])
    lower_quality = preprocess(source, str(tmp_path / "q"), PreprocessOptions(image_size=32, jpeg_quality=50),
                               echo=_quiet)
    assert lower_quality["digest"] != first["digest"], "other stored bytes are another dataset"
    stored_bytes = {name: sum(len(r["image"]) for r in _shard_rows(tmp_path / name)) for name in ("a", "q")}
    assert stored_bytes["q"] < stored_bytes["a"], "jpeg_quality takes effect"

    # a run over the same output that fails just before its manifest (other rejects this time) leaves
    # no manifest that disagrees with the files it names
    write_bytes = stage.storage.write_bytes

    def crash_at_the_manifest(uri: str, data: bytes) -> None:
        if uri.endswith("manifest.json"):
            raise OSError("crashed before writing the manifest")
        write_bytes(uri, data)

    monkeypatch.setattr(stage.storage, "write_bytes", crash_at_the_manifest)
    with pytest.raises(OSError, match="crashed before"):
        preprocess(source, str(tmp_path / "a"), PreprocessOptions(image_size=32, min_caption_chars=36), echo=_quiet)
    monkeypatch.undo()
    assert set(pq.read_table(tmp_path / "a" / "rejects.parquet").column("reason").to_pylist()) == {"caption_too_short"}
    assert _files_disagreeing_with_manifest(tmp_path / "a") == []

    # a rerun over the same output with other options replaces it cleanly
    again = preprocess(source, str(tmp_path / "a"), PreprocessOptions(image_size=32, rows_per_shard=30), echo=_quiet)
    assert again["digest"] == first["digest"]
    on_disk = sorted(p.name for p in (tmp_path / "a" / "shards").iterdir())
    assert on_disk == sorted(Path(s["path"]).name for s in again["shards"]), "stale shards are removed"

    changed = preprocess(source, str(tmp_path / "c"), PreprocessOptions(image_size=40), echo=_quiet)
    assert changed["digest"] != first["digest"]


def test_a_killed_run_leaves_the_previous_manifest_and_its_shards(tmp_path):
    output = tmp_path / "out"
    before = preprocess("synthetic://train?count=60&seed=1&image_size=32", str(output),
                        PreprocessOptions(image_size=32, rows_per_shard=20), echo=_quiet)
    manifest_text = (output / "manifest.json").read_text()
    old_shards = {Path(s["path"]).name for s in before["shards"]}

    script = ("import sys; from workflows.preprocess import preprocess, PreprocessOptions; "
              f"preprocess('synthetic://train?count=4000&seed=2&image_size=32', {str(output)!r}, "
              "PreprocessOptions(image_size=32, rows_per_shard=40))")
    # its temporary files (the rejects it had not yet copied out) die with it under tmp_path; Ray's stay put
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "TMPDIR": str(tmp_path / "tmp"),
           "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", tempfile.gettempdir())}
    env.pop("RAY_ADDRESS", None)
    child = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not ({p.name for p in (output / "shards").iterdir() if p.suffix == ".parquet"} - old_shards):
            assert child.poll() is None, "the second run ended before writing a shard"
            assert time.monotonic() < deadline, "the second run wrote no shard in time"
            time.sleep(0.2)  # polling for a file to appear, not timing a result
    finally:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
    assert (output / "manifest.json").read_text() == manifest_text
    for shard in before["shards"]:
        assert hashlib.sha256((output / shard["path"]).read_bytes()).hexdigest() == shard["sha256"]
    assert load_prepared(str(output)).count() == 60


def test_missing_columns_and_sources_fail_fast_naming_them(tmp_path):
    corpus.write_parquet(tmp_path / "data.parquet", corpus.clean_pairs(2), image_column="jpg", caption_column="txt")
    with pytest.raises(SourceError, match=r"caption column 'caption' not found in .*data.parquet; "
                                          r"columns are: key, jpg, txt"):
        preprocess(str(tmp_path / "data.parquet"), str(tmp_path / "out"), PreprocessOptions(image_key="jpg"),
                   echo=_quiet)
    csv_path = corpus.write_csv(tmp_path / "csv", corpus.clean_pairs(2))
    with pytest.raises(SourceError, match=r"caption column 'caption' not found .*columns are: filepath, title "
                                          r".*--caption-key"):
        preprocess(str(csv_path), str(tmp_path / "out"), echo=_quiet)
    with pytest.raises(SourceError, match=r"1 of 1 source files do not exist, e.g. .*nowhere.tar; its folder .* holds: "
                                          r"csv/, data.parquet$"):
        preprocess(str(tmp_path / "nowhere.tar"), str(tmp_path / "out"), echo=_quiet)
    with pytest.raises(SourceError, match=r"do not exist, e.g. .*absent/x.tar; its folder .*absent does not exist"):
        preprocess(str(tmp_path / "absent" / "x.tar"), str(tmp_path / "out"), echo=_quiet)
    with pytest.raises(SourceError, match=r"cannot tell the format .* nothing is at .*nowhere; its folder .* holds: "):
        preprocess(str(tmp_path / "nowhere"), str(tmp_path / "out"), echo=_quiet)
    with pytest.raises(SourceError, match=r"image folder .*nowhere does not exist .*; its folder .* holds: csv/"):
        preprocess(str(tmp_path / "nowhere"), str(tmp_path / "out"), PreprocessOptions(format="folder"), echo=_quiet)

    # several captions an image (COCO's), in one list cell: not text
    pq.write_table(pa.table({"image": [b"x"], "caption": [["a cat", "a small cat"]]}), tmp_path / "coco.parquet")
    with pytest.raises(SourceError, match=r"caption column 'caption' of .*coco.parquet holds list<.*>, not text "
                                          r"\(string or binary\) \(several captions an image: one row for each"):
        preprocess(str(tmp_path / "coco.parquet"), str(tmp_path / "out"), echo=_quiet)

    # a wrong member extension fails here too, not as every row rejected; the run below rejects row by row
    # the samples that lack a caption or an image (the bad-input corpus)
    corpus.write_webdataset(tmp_path / "wds", corpus.clean_pairs(2), shards=1)
    with pytest.raises(SourceError, match=r"no caption \(\.caption\) among the first 4 members of .*shard-00000.tar; "
                                          r"extensions found: jpg, txt \(choose with --caption-key\)"):
        preprocess(str(tmp_path / "wds"), str(tmp_path / "out"), PreprocessOptions(caption_key="caption"), echo=_quiet)
    with pytest.raises(SourceError, match=r"no image \(\.png\) among .*extensions found: jpg, txt .*--image-key"):
        preprocess(str(tmp_path / "wds"), str(tmp_path / "out"), PreprocessOptions(image_key="png"), echo=_quiet)
    corpus.write_folder(tmp_path / "folder", corpus.clean_pairs(2))
    folder = str(tmp_path / "folder")
    with pytest.raises(SourceError, match=r"no caption \(\.caption\) among the files of .*folder; extensions found"):
        preprocess(folder, str(tmp_path / "out"), PreprocessOptions(caption_key="caption"), echo=_quiet)
    with pytest.raises(SourceError, match=r"no label \(\.cls\) among the files of .*folder; "
                                          r"extensions found: jpg, txt"):
        preprocess(folder, str(tmp_path / "out"), PreprocessOptions(label_key="cls"), echo=_quiet)
    for query, name, bounds in (("count=1e3", "count", "1..100000000"), ("image_size=0", "image_size", "8..1024")):
        with pytest.raises(SourceError, match=rf"synthetic {name}=.* give an integer in {bounds}"):
            preprocess(f"synthetic://train?{query}", str(tmp_path / "out"), echo=_quiet)
    assert not (tmp_path / "out").exists()


def test_a_huge_caption_is_refused_before_it_is_decoded_and_cleaned():
    options = PreprocessOptions(max_caption_chars=100)
    with pytest.raises(stage.Reject) as info:
        stage.prepare_caption(b"\xff" * 4_000_000, options)  # not even UTF-8: refused for its size first
    assert (info.value.reason, info.value.detail) == ("caption_too_long", "4,000,000 bytes, for at most 100 characters")
    # whitespace that collapses is still read: only sizes no caption within the limit could have are refused
    assert stage.prepare_caption(b"a" + b" " * 2000 + b"cat", options) == "a cat"


def test_options_are_validated():
    with pytest.raises(ValueError, match="min_caption_chars"):
        PreprocessOptions(min_caption_chars=10, max_caption_chars=5)
    with pytest.raises(ValueError, match="extra"):
        PreprocessOptions(imagesize=3)
    with pytest.raises(ValueError, match="format\n  Input should be 'webdataset', 'parquet'"):
        PreprocessOptions(format="webdatset")  # a typo fails here, not after the splits before it ran
    with pytest.raises(ValueError, match=r"class names \[1\] are blank"):
        PreprocessOptions(classnames=["cat", " ", "dog"])
    assert PreprocessOptions(classnames="my classes.txt").classnames == "my classes.txt"


def test_large_jpegs_decode_at_reduced_scale_with_the_same_result_size():
    from clip_core.transforms import center_crop, resize_shortest_side

    large = corpus.encode(corpus.photo(1600, 1200, seed=1), quality=90)
    image, size, _ = stage.prepare_image(large, PreprocessOptions(image_size=224, image_format="png"))
    stored = Image.open(io.BytesIO(image))
    assert size == (1600, 1200) and stored.format == "PNG" and stored.size == (224, 224)
    reduced = Image.open(io.BytesIO(large))
    reduced.draft("RGB", (299, 224))  # the DCT scale that still covers 224 on the short side: 1/4
    assert reduced.size == (400, 300)
    full = Image.open(io.BytesIO(large)).convert("RGB")
    from_reduced, from_full = (center_crop(resize_shortest_side(i, 224), 224).tobytes() for i in (reduced, full))
    assert stored.tobytes() == from_reduced != from_full


def test_dataset_is_logged_to_mlflow_when_tracking_is_set(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    manifest = preprocess("synthetic://train?count=20&image_size=32", str(tmp_path / "out"),
                          PreprocessOptions(image_size=32), echo=_quiet)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rayclip")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.data.params["dataset_digest"] == manifest["digest"]
    assert run.data.metrics["rows_kept"] == 20
    assert run.inputs.dataset_inputs[0].dataset.digest == manifest["digest"].removeprefix("sha256:")[:36]


def test_cli_prints_a_summary_and_names_bad_columns(tmp_path, capsys):
    # in this process and its Ray (the console script's own start-up is test_project.py's)
    assert cli.main(["preprocess", "synthetic://train?count=30&image_size=32", str(tmp_path / "out"),
                     "--image-size", "32"]) == 0
    assert "preprocess: read 30, kept 30, rejected 0" in capsys.readouterr().out
    corpus.write_parquet(tmp_path / "x.parquet", corpus.clean_pairs(1))
    assert cli.main(["preprocess", str(tmp_path / "x.parquet"), str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert "image column 'image' not found" in error and "columns are: key, jpg, txt" in error


def test_preprocessing_and_decoding_run_without_torch(tmp_path):
    """Ray Data runs these UDFs in worker processes of their own (a cluster's CPU nodes run nothing
    else): importing torch there would cost each process ~260 MiB of private memory and seconds of
    start-up for code that only reads, resizes, tokenizes, decodes and orders the train stage's rows."""
    code = f"""
import sys
import pyarrow as pa
import pyarrow.parquet as pq
from workflows.preprocess import PreprocessOptions, decode_batch, process_batch, write_shard
from workflows.preprocess_actors import Deduplicate
from workflows.sources import SourceSpec, plan_files, read_source_batch
from workflows.synthetic import split_class_names

spec = SourceSpec(format="synthetic")
(chunk,) = plan_files("synthetic://train?count=12&image_size=64", spec)
raw = pa.concat_tables(read_source_batch(pa.table({{"uri": [chunk]}}), spec))
summary = write_shard(Deduplicate()(process_batch(raw, PreprocessOptions(image_size=64,
                                                                         classnames=split_class_names("train")))),
                      {str(tmp_path)!r})
shard = summary.column("shard")[0].as_py()
decoded = decode_batch(pq.read_table({str(tmp_path)!r} + "/" + shard.rsplit("/", 1)[-1]).to_pydict(), 64)
assert decoded["image"].shape == (12, 64, 64, 3) and decoded["tokens"].shape == (12, 77), summary
# the train stage's tasks: reading the rows to keep, and a pass's order of them
from workflows.train_rows import _read_rows, pass_order
table, counts = _read_rows([[{str(tmp_path)!r} + "/" + shard.rsplit("/", 1)[-1]]])
assert counts == [12] and sorted(pass_order(0, 1, (12,), None)) == list(range(12))
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, f"{{len(loaded)}} torch modules imported: {{loaded[:3]}}…"
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
