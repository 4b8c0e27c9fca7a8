"""Reading raw sources and processing their rows, without Ray: the functions the preprocess stream maps
(read_source_batch, process_batch, Deduplicate), called directly on small files."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import corpus
from workflows import cli, sources, storage
from workflows import preprocess as preprocess_stage
from workflows.pipeline import load_config
from workflows.preprocess import PreprocessOptions, Reject, process_batch, resolve_label
from workflows.preprocess_actors import Deduplicate
from workflows.sources import RAW_SCHEMA, SourceError, SourceSpec, plan_files, read_source_batch


def _raw_rows(*rows: dict) -> pa.Table:
    return pa.Table.from_pylist([{"source": "src", **row} for row in rows], schema=RAW_SCHEMA)


def test_a_label_of_thousands_of_digits_is_an_invalid_label_not_a_failed_run():
    with pytest.raises(Reject) as info:
        resolve_label("1" * 5000, None)  # int() refuses more than 4,300 digits
    assert info.value.reason == "invalid_label" and info.value.detail == f"label {'1' * 40}… outside 0..2147483647"
    with pytest.raises(Reject, match="outside 0..1"):
        resolve_label("9" * 11, ["cat", "dog"])
    assert resolve_label("0" * 5000 + "1", ["cat", "dog"]) == 1, "leading zeros are still the index"
    assert resolve_label("2147483647", None) == 2**31 - 1
    # an integer column beside a NaN, as pandas' to_csv writes it (a Parquet reader gets the floats as such)
    assert [resolve_label(raw, ["cat", "dog"]) for raw in ("1.0", "0.", "1.000")] == [1, 0, 1]
    with pytest.raises(Reject, match=r"label '1\.5' is not one of the 2 class names"):
        resolve_label("1.5", ["cat", "dog"])

    image = corpus.encode(corpus.photo(64, 64))
    table = process_batch(_raw_rows({"key": "huge", "image": image, "caption": b"a dog", "label": "1" * 5000},
                                    {"key": "fine", "image": image, "caption": b"a dog", "label": "1"}),
                          PreprocessOptions(image_size=32, label_key="label"))
    assert [(r["key"], r["reason"], r["label"]) for r in table.to_pylist()] == [("huge", "invalid_label", None),
                                                                              ("fine", None, 1)]


def _read(uri, spec: SourceSpec) -> pa.Table:
    return pa.concat_tables(read_source_batch(pa.table({"uri": [str(uri)]}), spec))


def test_an_image_with_several_captions_keeps_every_caption_and_drops_only_a_repeated_pair(tmp_path):
    # COCO's and Flickr's layout: one row per (image, caption), five captions an image
    corpus.write_csv(tmp_path, corpus.clean_pairs(1))
    image = "images/pair0-0000.jpg"
    captions = [f"caption number {i} of the same image" for i in range(5)]
    (tmp_path / "coco.csv").write_text("filepath,caption\n" + "".join(f"{image},{c}\n" for c in captions)
                                       + f"{image},caption  number 0 of the same image \n")  # the same once cleaned
    raw = _read(tmp_path / "coco.csv", SourceSpec(format="csv"))
    rows = Deduplicate()(process_batch(raw, PreprocessOptions(image_size=32))).to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [*((f"coco.csv:{i}", None) for i in range(5)),
                                                      ("coco.csv:5", "duplicate")]
    assert rows[5]["detail"] == f"same pixels and caption as row 0 of {tmp_path / 'coco.csv'} (counting from 0)"


def test_images_sharing_a_stem_are_each_counted_in_a_folder_and_keyed_apart_in_an_imagefolder(tmp_path):
    one, two = (corpus.encode(corpus.photo(64, 64, seed=seed)) for seed in (1, 2))
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "cat.jpg").write_bytes(one)
    (tmp_path / "folder" / "cat.png").write_bytes(two)
    (tmp_path / "folder" / "cat.txt").write_text("a cat")
    rows = _read(tmp_path / "folder", SourceSpec(format="folder")).to_pylist()
    assert [(r["key"], r["reason"], r["caption_uri"] and r["caption_uri"].rpartition("/")[2]) for r in rows] == [
        ("cat.png", "missing_caption", None), ("cat", None, "cat.txt")]
    assert rows[0]["detail"] == "cat.jpg has the stem's caption sidecar: give each image a stem of its own"
    # an imagefolder has no sidecars: both are images of the class, keyed apart
    (tmp_path / "val" / "n01").mkdir(parents=True)
    for name, data in (("a.jpg", one), ("a.png", two), ("b.jpg", one)):
        (tmp_path / "val" / "n01" / name).write_bytes(data)
    rows = _read(tmp_path / "val", SourceSpec(format="imagefolder")).to_pylist()
    assert [(r["key"], r["label"]) for r in rows] == [("n01/a.jpg", "0"), ("n01/a.png", "0"), ("n01/b", "0")]


def test_a_folder_sidecar_that_cannot_be_read_rejects_its_row_and_the_rest_of_the_folder_is_read(tmp_path,
                                                                                                   monkeypatch):
    pairs = corpus.clean_pairs(6)
    corpus.write_folder(tmp_path, pairs, labels=["0", "1", "0", "1", "0", "1"])
    for key, _, _ in pairs:
        (tmp_path / f"{key}.json").write_text("{}")
    read_bytes = storage.read_bytes

    def flaky(uri, max_bytes=None):
        if uri.endswith("pair0-0001.json"):  # listed, then deleted before it was read
            raise FileNotFoundError(f"[Errno 2] Failed to open local file '{uri}'")
        if uri.endswith("pair0-0003.cls"):
            raise OSError("When reading information for key 'pair0-0003.cls': AWS Error SLOW_DOWN (HTTP status 503)")
        return read_bytes(uri, max_bytes)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    rows = _read(tmp_path, SourceSpec(format="folder", label_key="cls")).to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("pair0-0000", None), ("pair0-0001", "unreadable_source"), ("pair0-0002", None),
        ("pair0-0003", "unreadable_source"), ("pair0-0004", None), ("pair0-0005", None)]
    assert rows[1]["detail"].startswith("sidecar pair0-0001.json: FileNotFoundError: ")
    assert rows[3]["detail"] == ("sidecar pair0-0003.cls: OSError: When reading information for key "
                                 "'pair0-0003.cls': AWS Error SLOW_DOWN (HTTP status 503)")
    assert [r["label"] for r in rows if r["reason"] is None] == ["0", "0", "0", "1"]


def test_a_json_caption_member_is_read_for_its_caption_field(tmp_path):
    # webdataset's and img2dataset's per-sample metadata: --caption-key json takes its "caption"
    image = corpus.encode(corpus.photo(64, 64))
    documents = {"img2dataset": {"caption": "a red dog", "url": "http://x", "key": "000"},
                 "no-caption": {"url": "http://x", "alt": "a red dog"}, "not-text": {"caption": ["a", "b"]},
                 "a-list": ["a red dog"], "not-json": "{caption: a red dog", "huge": {"caption": "a" * 2**20}}
    corpus.write_tar(tmp_path / "shard.tar", [
        member for key, document in documents.items() for member in
        ((f"{key}.jpg", image), (f"{key}.json", (document if isinstance(document, str) else
                                                 json.dumps(document)).encode()))])
    raw = _read(tmp_path / "shard.tar", SourceSpec(format="webdataset", caption_key="json"))
    rows = {r["key"].removeprefix("shard.tar:"): r
            for r in process_batch(raw, PreprocessOptions(image_size=32)).to_pylist()}
    assert rows["img2dataset"]["caption"] == "a red dog" and rows["img2dataset"]["reason"] is None
    assert json.loads(rows["img2dataset"]["metadata"])["url"] == "http://x", "still passed through as metadata"
    assert {key: (row["reason"], row["detail"]) for key, row in rows.items() if key != "img2dataset"} == {
        "no-caption": ("missing_caption", "member no-caption.json has no text 'caption' field (its fields: url, alt)"),
        "not-text": ("missing_caption", "member not-text.json has no text 'caption' field (its fields: caption)"),
        "a-list": ("missing_caption", "member a-list.json has no text 'caption' field (list)"),
        "not-json": ("missing_caption", "member not-json.json is not a JSON document: Expecting property name "
                                        "enclosed in double quotes: line 1 column 2 (char 1)"),
        "huge": ("caption_too_long", "member huge.json is 1,048,591 bytes, over the limit of 1,048,576")}

    # an image folder with .json sidecars (img2dataset's `files` output) reads them the same way
    corpus.write_folder(tmp_path / "folder", corpus.clean_pairs(2))
    (tmp_path / "folder" / "pair0-0000.json").write_text(json.dumps({"caption": "a blue cat", "url": "http://y"}))
    (tmp_path / "folder" / "pair0-0001.json").write_text(json.dumps({"url": "http://y"}))
    raw = _read(tmp_path / "folder", SourceSpec(format="folder", caption_key="json"))
    rows = process_batch(raw, PreprocessOptions(image_size=32)).to_pylist()
    assert [(r["key"], r["caption"], r["reason"], r["detail"]) for r in rows] == [
        ("pair0-0000", "a blue cat", None, None),
        ("pair0-0001", None, "missing_caption",
         "sidecar pair0-0001.json has no text 'caption' field (its fields: url)")]


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tmp_path):
    corpus.write_csv(tmp_path, corpus.clean_pairs(2))
    path = tmp_path / "excel.csv"  # Excel's "CSV UTF-8", pandas' to_csv(encoding="utf-8-sig")
    path.write_text((tmp_path / "pairs.csv").read_text(), encoding="utf-8-sig")
    spec = SourceSpec(format="csv", caption_key="title")
    assert plan_files(str(path), spec) == [str(path)]
    rows = _read(path, spec).to_pylist()
    assert [(r["image_uri"], r["caption"], r["reason"]) for r in rows] == [
        (f"{tmp_path}/images/pair0-{i:04d}.jpg", f"a photo number {i} of set 0".encode(), None) for i in range(2)]


def test_a_tsv_is_read_with_quoting_as_pandas_writes_it_and_a_quote_left_open_is_a_counted_reject(tmp_path):
    corpus.write_csv(tmp_path, corpus.clean_pairs(1), delimiter="\t")
    image = "images/pair0-0000.jpg"
    (tmp_path / "openclip.tsv").write_text(  # pandas' to_csv(sep="\t"): OpenCLIP's --csv-separator default
        f'filepath\ttitle\n{image}\t"the ""Thinker"" by Rodin"\n{image}\t"two\nlines"\n'
        f'{image}\t"six inch" figurine\n{image}\tplain caption\n{image}\t"a quote left open\n{image}\tswallowed\n')
    rows = _read(tmp_path / "openclip.tsv", SourceSpec(format="csv", caption_key="title")).to_pylist()
    assert [(r["key"], r["caption"], r["reason"]) for r in rows] == [
        ("openclip.tsv:0", b'the "Thinker" by Rodin', None), ("openclip.tsv:1", b"two\nlines", None),
        ("openclip.tsv:2", None, "unreadable_source"), ("openclip.tsv:3", b"plain caption", None),
        ("openclip.tsv:4", None, "unreadable_source"), ("openclip.tsv:5", b"swallowed", None)]
    assert rows[2]["detail"] == ("line 5: '\t' expected after '\"' (a cell that opens with a quote closes with "
                                 "one, and a quote inside it is written twice)")
    # the quote left open took the lines after it into one record: its own line is the reject, the rest are
    # read again, each counted
    assert rows[4]["detail"].startswith("line 7: unexpected end of data (lines 7-8 read as one record")


def test_a_stray_quote_in_a_file_not_written_by_pandas_costs_its_own_row_only(tmp_path):
    corpus.write_csv(tmp_path, corpus.clean_pairs(1), delimiter="\t")
    image = "images/pair0-0000.jpg"
    lines = [f"{image}\tcaption {i}" for i in range(1000)]
    lines[5] = f'{image}\t"quoted start of caption'
    (tmp_path / "hand.tsv").write_text("filepath\ttitle\n" + "\n".join(lines) + "\n")
    rows = _read(tmp_path / "hand.tsv", SourceSpec(format="csv", caption_key="title")).to_pylist()
    assert len(rows) == 1000 and [r["reason"] for r in rows].count("unreadable_source") == 1
    assert rows[5]["detail"].startswith("line 7: ") and rows[999]["caption"] == b"caption 999"


def test_a_row_with_more_cells_than_the_header_is_rejected_not_kept_with_its_caption_cut(tmp_path):
    # csv keeps the cells past the header's apart: the row would keep "a cat" of "a cat, sitting on a mat"
    (tmp_path / "pairs.csv").write_text('filepath,caption\na.jpg,a cat, sitting on a mat\nb.jpg,"a dog, running"\n'
                                        "c.jpg,a trailing separator,\n")
    rows = _read(tmp_path / "pairs.csv", SourceSpec(format="csv")).to_pylist()
    assert [(r["reason"], r["caption"]) for r in rows] == [
        ("unreadable_source", None), (None, b"a dog, running"), (None, b"a trailing separator")]
    assert rows[0]["detail"] == ("line 2: 3 cells where the header has 2 (the first left over: ' sitting on a mat'): "
                                 "a cell holding the separator ',' is quoted, as pandas' to_csv writes it")


def test_the_chunks_of_a_synthetic_source_number_its_rows_as_one_file():
    chunks = sources._plan_synthetic("synthetic://train?count=1000&seed=0&image_size=16")
    spec = SourceSpec(format="synthetic")
    positions = [p for chunk in chunks for p in _read(chunk, spec).column("position").to_pylist()]
    assert len(chunks) == 2 and positions == list(range(1000))


def test_a_tab_separated_csv_reads_with_csv_separator_and_without_it_fails_saying_to_pass_it(tmp_path, monkeypatch,
                                                                                              capsys):
    corpus.write_csv(tmp_path, corpus.clean_pairs(2), delimiter="\t")
    (tmp_path / "pairs.tsv").rename(tmp_path / "openclip.csv")  # OpenCLIP's --csv-separator is a tab by default
    with pytest.raises(SourceError, match=r"image column 'filepath' not found in .*openclip.csv; columns are: .* "
                                          r"\(the header is separated by '\\t', not ',': pass --csv-separator '\\t', "
                                          r"or set csv_separator in a pipeline config's preprocess options\)"):
        plan_files(str(tmp_path / "openclip.csv"), SourceSpec(format="csv", caption_key="title"))
    spec = SourceSpec(format="csv", caption_key="title", csv_separator="\t")
    assert [r["caption"] for r in _read(plan_files(str(tmp_path / "openclip.csv"), spec)[0], spec).to_pylist()] == [
        b"a photo number 0 of set 0", b"a photo number 1 of set 0"]
    (tmp_path / "excel.csv").write_text("filepath;title\nimages/pair0-0000.jpg;un chat, noir\n")  # Excel's, in Europe
    spec = SourceSpec(format="csv", caption_key="title", csv_separator=";")
    assert [r["caption"] for r in _read(plan_files(str(tmp_path / "excel.csv"), spec)[0], spec).to_pylist()] == [
        b"un chat, noir"]

    # the option as typed: `--csv-separator '\t'` (a backslash and a t), or in a pipeline config
    assert {PreprocessOptions(csv_separator=typed).csv_separator for typed in ("\\t", "tab", "\t")} == {"\t"}
    with pytest.raises(ValueError, match="csv_separator ', ': give one character other than a quote or a line break"):
        PreprocessOptions(csv_separator=", ")
    assert load_config(None, ["data.split_options.zeroshot.csv_separator=;",
                              "data.split_options.zeroshot.classnames=[cat]"]).data.options("zeroshot").csv_separator \
        == ";"
    seen = []
    monkeypatch.setattr(preprocess_stage, "preprocess", lambda source, output, options: seen.append(options))
    assert cli.main(["preprocess", str(tmp_path / "openclip.csv"), str(tmp_path / "out"), "--caption-key", "title",
                     "--csv-separator", "\\t"]) == 0
    assert seen[0].csv_separator == "\t"
    monkeypatch.undo()
    assert cli.main(["preprocess", str(tmp_path / "openclip.csv"), str(tmp_path / "out"), "--caption-key", "title"]) \
        == 2, "planning fails before Ray starts"
    assert "pass --csv-separator '\\t'" in capsys.readouterr().err


def test_webdataset_keys_name_their_tar_and_an_exact_duplicate_is_dropped_however_its_rows_are_keyed(tmp_path):
    # two tars written apart, each numbering its samples from 000; the first also holds one sample twice
    one, two = (corpus.encode(corpus.photo(64, 64, seed=seed)) for seed in (1, 2))
    (tmp_path / "part").mkdir()
    corpus.write_tar(tmp_path / "s0.tar", [("000.jpg", one), ("000.txt", b"a cat"), ("001.jpg", two),
                                          ("001.txt", b"a dog"), ("000.jpg", one), ("000.txt", b"a cat")])
    corpus.write_tar(tmp_path / "part" / "s0.tar", [("000.jpg", two), ("000.txt", b"a dog on a mat")])
    spec = SourceSpec(format="webdataset", root=str(tmp_path))  # as preprocess plans it: the files' folder
    raw = pa.concat_tables(read_source_batch(pa.table({"uri": [str(tmp_path / "s0.tar"),
                                                               str(tmp_path / "part" / "s0.tar")]}), spec))
    processed = process_batch(raw, PreprocessOptions(image_size=32))
    deduplicate = Deduplicate()
    rows = deduplicate(processed).to_pylist()
    assert [(r["key"], r["position"], r["reason"]) for r in rows] == [
        ("s0.tar:000", 0, None), ("s0.tar:001", 1, None), ("s0.tar:000#2", 2, "duplicate"),
        ("part/s0.tar:000", 0, None)]
    assert rows[2]["detail"] == f"same pixels and caption as row 0 of {tmp_path / 's0.tar'} (counting from 0)"
    # a batch seen again (a retried call) is marked as the first time: its first occurrences are no duplicates
    assert deduplicate(processed).to_pylist() == rows

    # a tar whose samples' members are interleaved (a.jpg b.jpg a.txt b.txt): every row keyed once, each
    # reject saying why
    corpus.write_tar(tmp_path / "mixed.tar", [("a.jpg", one), ("b.jpg", two), ("a.txt", b"a cat"),
                                             ("b.txt", b"a dog")])
    rows = process_batch(_read(tmp_path / "mixed.tar", SourceSpec(format="webdataset")),
                         PreprocessOptions(image_size=32)).to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [
        ("mixed.tar:a", "missing_caption"), ("mixed.tar:b", "missing_caption"),
        ("mixed.tar:a#2", "missing_image"), ("mixed.tar:b#2", "missing_image")]
    assert "a's members are not together in the tar" in rows[2]["detail"]

    # a Parquet key column holding a row twice (two copies of a partition concatenated); its keys go with
    # their file, as a tar's: img2dataset's parquet shards from two runs each number theirs from 0
    corpus.write_parquet(tmp_path / "keyed.parquet", [("a", one, "a cat"), ("b", two, "a dog"), ("a", one, "a cat")])
    corpus.write_parquet(tmp_path / "part" / "keyed.parquet", [("a", two, "a dog on a mat")])
    spec = SourceSpec(format="parquet", image_key="jpg", caption_key="txt", root=str(tmp_path))
    raw = pa.concat_tables(read_source_batch(pa.table({"uri": [str(tmp_path / "keyed.parquet"),
                                                               str(tmp_path / "part" / "keyed.parquet")]}), spec))
    rows = Deduplicate()(process_batch(raw, PreprocessOptions(image_size=32))).to_pylist()
    assert [(r["key"], r["reason"]) for r in rows] == [("keyed.parquet:a", None), ("keyed.parquet:b", None),
                                                      ("keyed.parquet:a", "duplicate"), ("part/keyed.parquet:a", None)]


def test_a_parquet_text_image_column_is_read_as_paths_beside_the_file_and_never_downloads(tmp_path):
    corpus.write_csv(tmp_path, corpus.clean_pairs(1))  # images/pair0-0000.jpg
    image = tmp_path / "images" / "pair0-0000.jpg"
    pq.write_table(pa.table({"filepath": ["images/pair0-0000.jpg", str(image), f"file://{image}",
                                          "https://example.com/a.jpg", " ", None],
                             "caption": ["relative", "absolute", "file uri", "on the web", "blank", "none"]}),
                   tmp_path / "paths.parquet")
    spec = SourceSpec(format="parquet", image_key="filepath")
    raw = _read(plan_files(str(tmp_path / "paths.parquet"), spec)[0], spec)
    assert raw.column("image_uri").to_pylist()[:4] == [str(image), str(image), f"file://{image}",
                                                       "https://example.com/a.jpg"]
    rows = process_batch(raw, PreprocessOptions(image_size=32, image_key="filepath")).to_pylist()
    assert [(r["caption"], r["reason"]) for r in rows] == [
        ("relative", None), ("absolute", None), ("file uri", None), (None, "unsupported_uri"), (None, "missing_image"),
        (None, "missing_image")]
    assert "never downloads" in rows[3]["detail"]


def test_a_parquet_row_group_over_the_memory_budget_is_refused_saying_how_to_rewrite_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_ROW_GROUP_BYTES", 64 * 2**10)  # 256 MiB in earnest: a small file shows it
    table = pa.table({"image": [bytes([i]) * 10_000 for i in range(20)], "caption": [f"photo {i}" for i in range(20)]})
    pq.write_table(table, tmp_path / "one-group.parquet")  # pyarrow's default: up to a million rows a group
    (row,) = _read(tmp_path / "one-group.parquet", SourceSpec(format="parquet")).to_pylist()
    assert (row["key"], row["reason"]) == ("one-group.parquet#unreadable", "unreadable_source")
    assert row["detail"].startswith("ValueError: row group 0 holds 200,")
    assert row["detail"].endswith(" bytes uncompressed in 20 rows, over the 65,536 a read task holds at once; not "
                                  "read: rewrite the file with smaller row groups, e.g. pyarrow.parquet.write_table("
                                  "table, path, row_group_size=3)")
    pq.write_table(table, tmp_path / "small-groups.parquet", row_group_size=3)
    rows = _read(tmp_path / "small-groups.parquet", SourceSpec(format="parquet")).to_pylist()
    assert len(rows) == 20 and {row["reason"] for row in rows} == {None}


def test_an_imagefolder_labels_each_image_by_its_class_folder_as_imagenet_val_is_read(tmp_path):
    """OpenCLIP's --imagenet-val: a folder of images per class, label i the i-th folder in sorted order (as
    torchvision's ImageFolder numbers them, so line i of OpenCLIP's class-name list names it)."""
    from workflows.preprocess import preprocess

    root = tmp_path / "val"
    for folder, seed in (("n02", 1), ("n01", 2), ("n01/nested", 3), ("n03", 4)):
        (root / folder).mkdir(parents=True)
        (root / folder / f"img{seed}.JPEG").write_bytes(corpus.encode(corpus.photo(64, 64, seed=seed)))
    (root / "loose.png").write_bytes(corpus.encode(corpus.photo(64, 64), "PNG"))
    (root / "n03" / "README").write_text("not an image")
    assert sources.detect_format(str(root)) == "imagefolder"
    assert sources.imagefolder_classes(str(root)) == ["n01", "n02", "n03"]
    spec = SourceSpec(format="imagefolder")
    assert plan_files(str(root), spec) == [str(root)]
    names = ["tench", "goldfish", "great white shark"]
    rows = process_batch(_read(root, spec), PreprocessOptions(image_size=32, classnames=names)).to_pylist()
    assert [(r["key"], r["label"], r["caption"], r["reason"]) for r in rows] == [
        ("loose", None, None, "missing_label"), ("n01/img2", 0, "n01", None), ("n01/nested/img3", 0, "n01", None),
        ("n02/img1", 1, "n02", None), ("n03/img4", 2, "n03", None)]

    # before any work (Ray is not started): a class-name list of another length, or no class folders
    with pytest.raises(SourceError, match=r"2 class names for the 3 class folders of .*val \(line i names the "
                                          r"i-th folder in sorted order: n01, …\)"):
        preprocess(str(root), str(tmp_path / "out"), PreprocessOptions(format="imagefolder", classnames=names[:2]))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(corpus.encode(corpus.photo(64, 64)))
    with pytest.raises(SourceError, match="has no subfolders of images"):
        plan_files(str(tmp_path / "flat"), spec)
    with pytest.raises(SourceError, match="an imagefolder source takes no --caption-key"):
        plan_files(str(root), SourceSpec(format="imagefolder", caption_key="txt"))
    # images in subfolders with sidecars of their own (any extension) are captioned: a folder source
    (root / "n02" / "img1.caption").write_text("a goldfish")
    assert sources.detect_format(str(root)) == "folder"
    # a pipeline's zero-shot split in this layout needs no class-name list: the folders name the classes
    load_config(None, [f"data.zeroshot={root}", "data.split_options.zeroshot.format=imagefolder"])


def test_img2datasets_files_output_is_read_as_a_folder_not_by_its_metadata_parquet(tmp_path):
    # output_format="files": a folder of images with .txt and .json sidecars a shard, and beside it the
    # shard's metadata as a .parquet (url, key, caption, status; no images) and a stats .json
    (tmp_path / "00000").mkdir()
    for i, (_, image, caption) in enumerate(corpus.clean_pairs(2)):
        (tmp_path / "00000" / f"00000000{i}.jpg").write_bytes(image)
        (tmp_path / "00000" / f"00000000{i}.txt").write_text(caption)
        (tmp_path / "00000" / f"00000000{i}.json").write_text(json.dumps({"caption": caption, "url": "http://x"}))
    pq.write_table(pa.table({"url": ["http://x"] * 2, "key": ["000000000", "000000001"], "status": ["success"] * 2}),
                   tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert sources.detect_format(str(tmp_path)) == "folder"
    rows = process_batch(_read(tmp_path, SourceSpec(format="folder")), PreprocessOptions(image_size=32)).to_pylist()
    assert [(r["key"], r["caption"], r["reason"]) for r in rows] == [
        ("00000/000000000", "a photo number 0 of set 0", None), ("00000/000000001", "a photo number 1 of set 0", None)]
    # a table of the images with the images beside it and no sidecars is still that table
    (tmp_path / "00000" / "000000000.txt").unlink()
    (tmp_path / "00000" / "000000001.txt").unlink()
    for json_file in (tmp_path / "00000").glob("*.json"):
        json_file.unlink()
    assert sources.detect_format(str(tmp_path)) == "parquet"


def test_a_tar_cut_short_or_with_a_corrupt_header_keeps_the_samples_before_and_counts_itself_unreadable(tmp_path):
    # tarfile's stream reading stops without an error at either: the samples after would be lost uncounted
    members = [m for key, image, caption in corpus.clean_pairs(4)
               for m in ((f"{key}.jpg", image), (f"{key}.txt", caption.encode()))]
    whole = corpus.write_tar(tmp_path / "whole.tar", members).read_bytes()
    spans = [512 + -(-len(data) // 512) * 512 for _, data in members]  # a member's header and its data
    third, end = sum(spans[:4]), sum(spans)  # sample 2's first header; the last member's end
    damaged = bytearray(whole)
    damaged[third + 148] ^= 0x11  # its checksum
    cases = {"whole.tar": whole, "damaged.tar": bytes(damaged), "cut.tar": whole[:third],
             "cut_in_header.tar": whole[:third + 100], "lone_zero_block.tar": whole[:end] + bytes(512)}
    rows = {}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        rows[name] = _read(tmp_path / name, SourceSpec(format="webdataset")).to_pylist()
    assert [r["key"] for r in rows["whole.tar"]] == [f"whole.tar:pair0-000{i}" for i in range(4)]
    for name, message in (("damaged.tar", f"stopped at byte {third:,} with data after it: a corrupt member header"),
                          ("cut.tar", f"the tar ends at byte {third:,}, inside or before a member's header"),
                          ("cut_in_header.tar", f"the tar ends at byte {third + 100:,}")):
        assert [(r["key"], r["reason"]) for r in rows[name]] == [
            (f"{name}:pair0-0000", None), (f"{name}:pair0-0001", None), (f"{name}#unreadable", "unreadable_source")]
        assert message in rows[name][2]["detail"], rows[name][2]["detail"]
    # an archive ended by one zero block instead of two (GNU tar reads it too) is whole
    assert [r["reason"] for r in rows["lone_zero_block.tar"]] == [None] * 4


def test_a_prepared_caption_is_tokenized_as_openclip_tokenizes_the_raw_text_and_case_makes_no_new_pair():
    import clip_core

    image = corpus.encode(corpus.photo(64, 64))
    raw = "<b>Tom &amp;amp;amp; Jerry</b>"  # cleaning twice unescaped two entities more than once does
    rows = process_batch(_raw_rows({"key": "k0", "image": image, "caption": raw.encode()},
                                   {"key": "k1", "image": image, "caption": b"a cat"},
                                   {"key": "k2", "image": image, "caption": b"A  Cat"},
                                   {"key": "k3", "image": image, "caption": b"a dog"}),
                         PreprocessOptions(image_size=32))
    tokenize = clip_core.get_tokenizer()
    first = rows.to_pylist()[0]
    assert first["tokens"] == [t for t in tokenize(raw)[0].tolist() if t], "OpenCLIP's tokens of the raw caption"
    assert first["caption"] == clip_core.tokenizer.normalize_caption(raw)
    # "A Cat" is tokenized as "a cat" is: one training pair, the second a duplicate
    deduplicated = Deduplicate()(rows.set_column(rows.schema.get_field_index("position"), "position",
                                                 pa.array(range(4), pa.int64()))).to_pylist()
    assert [(r["key"], r["reason"]) for r in deduplicated] == [("k0", None), ("k1", None), ("k2", "duplicate"),
                                                              ("k3", None)]
