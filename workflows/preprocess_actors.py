"""The preprocess stream's two actors, in a module of their own: an actor's process imports its
class's module, and `preprocess.py`'s imports (torch, through clip_core) cost each actor ~2 s of
start-up on 2 cores, during which Ray Data holds the stream back for the dedupe actor."""

from __future__ import annotations

import hashlib

import pyarrow as pa


class Deduplicate:
    """Marks rows whose pixels and caption both equal an earlier row's. One actor sees the ordered
    stream, so the first occurrence in source order is kept, run after run."""

    def __init__(self):
        # hash of (pixels, caption) → (source, position) of its first row. An image with several captions
        # (COCO's, Flickr's: one row a caption) is several pairs, each kept; a hash of the pair holds 16 bytes
        # where the caption itself would hold up to max_caption_chars, and the row's position where its key
        # took ~75 bytes more
        self.first_of: dict[bytes, tuple[str, int]] = {}
        self._sources: dict[str, str] = {}  # one string per source file, not one per row (~100 bytes a row)

    def __call__(self, batch: pa.Table) -> pa.Table:
        reasons, details = batch.column("reason").to_pylist(), batch.column("detail").to_pylist()
        rows = zip(batch.column("source").to_pylist(), batch.column("position").to_pylist(),
                   batch.column("pixel_hash").to_pylist(), batch.column("caption").to_pylist())
        for i, (source, position, pixel_hash, caption) in enumerate(rows):
            if reasons[i] is not None:
                continue
            # the caption as processing left it (normalized), in lower case as the tokenizer reads it ("A cat" and
            # "a cat" are one training pair); the pixel hash has a fixed length, so no separator
            pair = hashlib.sha256(f"{pixel_hash}{caption.lower()}".encode()).digest()[:16]
            first = self.first_of.setdefault(pair, (self._sources.setdefault(source, source), position))
            # a batch seen again (a retried call) marks nothing: the row is the first occurrence itself, told by its
            # place in its file, never by its key (a tar may hold a key twice, a Parquet key column any value)
            if first != (source, position):
                reasons[i], details[i] = "duplicate", (f"same pixels and caption as row {first[1]} of {first[0]} "
                                                       "(counting from 0)")
        batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", pa.array(reasons, pa.string()))
        return batch.set_column(batch.schema.get_field_index("detail"), "detail", pa.array(details, pa.string()))


class Progress:
    """Rows processed and rejected so far, as processing tasks finish batches: an actor, so the
    driver can log while the stream is still filling its first shard."""

    def __init__(self):
        self.processed = self.rejected = 0

    def add(self, processed: int, rejected: int) -> None:
        self.processed += processed
        self.rejected += rejected

    def totals(self) -> tuple[int, int]:
        return self.processed, self.rejected
