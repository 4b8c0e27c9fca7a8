"""Reading raw sources and processing their rows, without Ray: the functions the preprocess stream maps
(read_source_batch, process_batch, Deduplicate), called directly on small files."""

import pyarrow as pa
import pytest

import corpus
from workflows.preprocess import PreprocessOptions, Reject, process_batch, resolve_label
from workflows.sources import RAW_SCHEMA


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

    image = corpus.encode(corpus.photo(64, 64))
    table = process_batch(_raw_rows({"key": "huge", "image": image, "caption": b"a dog", "label": "1" * 5000},
                                    {"key": "fine", "image": image, "caption": b"a dog", "label": "1"}),
                          PreprocessOptions(image_size=32, label_key="label"))
    assert [(r["key"], r["reason"], r["label"]) for r in table.to_pylist()] == [("huge", "invalid_label", None),
                                                                              ("fine", None, 1)]
