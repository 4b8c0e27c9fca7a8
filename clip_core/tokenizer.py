"""CLIP's byte-level BPE tokenizer (vocab 49,408, context 77).

Text is cleaned as OpenAI's and OpenCLIP's tokenizers clean it (ftfy, HTML unescape,
whitespace collapse, lower case), split with CLIP's pattern, byte-encoded, and merged with
the released BPE merges, which ship in `assets/` with their licence.
"""

from __future__ import annotations

import functools
import gzip
import html
from importlib import resources
from typing import TYPE_CHECKING

import numpy as np
import regex

if TYPE_CHECKING:
    import torch

# OpenCLIP's spellings: the same strings inside a caption become the special ids, as there
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
TOKENIZER_ID = "clip-bpe-49408"
_MERGES_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = VOCAB_SIZE - 256 * 2 - 2

_SPLIT = regex.compile(
    r"""<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# ASCII text with none of these is left unchanged by ftfy.fix_text: skipping it is a large speed-up
_FTFY_TOUCHES_ASCII = regex.compile(r"[&\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable unicode characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + shifted)
            shifted += 1
    return mapping


def normalize_caption(text: str) -> str:
    """ftfy + double HTML unescape + whitespace collapse: CLIP's cleaning, case kept."""
    if not text.isascii() or _FTFY_TOUCHES_ASCII.search(text):
        import ftfy

        text = ftfy.fix_text(text)
    return " ".join(html.unescape(html.unescape(text)).split())


def clean_text(text: str) -> str:
    """What CLIP's tokenizer splits: the normalized caption in lower case."""
    return normalize_caption(text).lower()


class Tokenizer:
    """`tokenizer(["a dog", "a cat"])` → LongTensor [2, 77] of BPE ids, [SOT] ... [EOT], 0-padded."""

    def __init__(self, context_length: int = CONTEXT_LENGTH):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (room for [SOT] and [EOT]), got {context_length}")
        self.context_length = context_length
        self.tokenizer_id = TOKENIZER_ID
        merges_text = resources.files("clip_core.assets").joinpath(_MERGES_FILE).read_bytes()
        if merges_text[:2] == b"\x1f\x8b":  # HTTP copies (MLflow's artifact proxy) may arrive decompressed
            merges_text = gzip.decompress(merges_text)
        merges = [tuple(line.split()) for line in merges_text.decode("utf-8").split("\n")[1 : _NUM_MERGES + 1]]
        self._byte_encoder = _bytes_to_unicode()
        symbols = list(self._byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        if len(vocab) != VOCAB_SIZE:
            raise RuntimeError(f"the BPE merges file gives a vocabulary of {len(vocab)}, expected {VOCAB_SIZE}")
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self._byte_decoder = {c: b for b, c in self._byte_encoder.items()}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._word_ids: dict[str, list[int]] = {SOT_TOKEN: [self.sot_token_id], EOT_TOKEN: [self.eot_token_id]}

    def _bpe(self, word: str) -> list[str]:
        """Merge the byte-symbols of one pre-token, lowest-ranked pair first."""
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self._ranks.get(pair, _NUM_MERGES))
            if best not in self._ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _ids_of(self, piece: str) -> list[int]:
        ids = self._word_ids.get(piece)
        if ids is None:
            word = "".join(self._byte_encoder[b] for b in piece.encode("utf-8"))
            ids = [self.encoder[token] for token in self._bpe(word)]
            if len(self._word_ids) < 1_000_000 and len(piece) <= 64:  # words, not a client's 1,000-letter ones
                self._word_ids[piece] = ids
        return ids

    def encode(self, text: str, max_ids: int | None = None, normalized: bool = False) -> list[int]:
        """BPE ids of `text` without [SOT]/[EOT] or padding; with `max_ids`, its first `max_ids` alone.
        `normalized`: `text` is `normalize_caption`'s already (a prepared caption), not cleaned again: the
        cleaning is not idempotent (ftfy leaves entities in text with a '<', each pass unescapes two more)."""
        ids: list[int] = []
        for piece in _SPLIT.findall(text.lower() if normalized else clean_text(text)):
            if max_ids is None:
                ids.extend(self._ids_of(piece))
                continue
            if len(ids) >= max_ids:
                break
            ids.extend(self._first_ids(piece, max_ids - len(ids)))
        return ids if max_ids is None else ids[:max_ids]

    def _first_ids(self, piece: str, wanted: int) -> list[int]:
        """The first `wanted` ids of a piece, from as short a prefix of it as gives them with room to spare:
        BPE is quadratic in a piece's length (a 1,000-letter random "word" takes ~70 ms), while a merge
        near a cut does not reach ids far before it."""
        spare = wanted + 8
        length = 4 * spare
        while length < len(piece):
            ids = self._ids_of(piece[:length])
            if len(ids) >= spare:
                return ids[:wanted]
            length *= 2
        return self._ids_of(piece)

    def decode(self, ids) -> str:
        """The text of token ids: of a tokenized row, what lies between its start token and its end token
        (the padding after it is 0, which is also the token `!`, so only the end says where text stops)."""
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        tokens = [self.decoder[i] for i in ids if i != self.sot_token_id]
        data = bytearray(self._byte_decoder[c] for c in "".join(tokens))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.LongTensor:
        if isinstance(texts, str):
            texts = [texts]
        length = context_length or self.context_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {row} is a {type(text).__name__}, not a str")
            ids = [self.sot_token_id, *self.encode(text, max_ids=length - 2)]
            ids.append(self.eot_token_id)  # truncation keeps [EOT]
            out[row, : len(ids)] = ids
        import torch  # here: preprocessing uses `encode` alone, without torch

        return torch.from_numpy(out)


def get_tokenizer(context_length: int | str = CONTEXT_LENGTH) -> Tokenizer:
    """The CLIP tokenizer; built once per context length and shared. A model's name (or config file) for
    the context length gives that model's, as OpenCLIP's `get_tokenizer("ViT-B-32")`."""
    if isinstance(context_length, str):
        from .config import get_config

        context_length = get_config(context_length).text.context_length
    return _tokenizer(context_length)


@functools.lru_cache(maxsize=4)
def _tokenizer(context_length: int) -> Tokenizer:
    return Tokenizer(context_length)
