import random

import open_clip
import pytest
import torch

import clip_core
from clip_core.tokenizer import clean_text

WORDS = ("a photo of the dog cat small large red green blue triangle circle on in with background left right "
         "top bottom café naïve Straße über São Paulo Zürich don't it's we're they've I'm you'll he'd").split()
EXTRAS = ["🐶", "🎉🎉", "日本語", "Ελληνικά", "русский", "&amp;", "&lt;b&gt;", "&#39;", "&quot;", "&nbsp;",
          "\u00a0", "\t", "\n", "  ", "1999", "3.14", "$5", "#tag", "@user", "C++", "e-mail", "U.S.A.",
          "ﬁne", "ＡＢＣ", "Ã©", "â€™", "\u200b", "\x07", "<end_of_text>", "<start_of_text>", "<br/>", "’", "“quoted”"]


def varied_captions(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    captions = ["", " ", "A", "&amp;amp;", "x" * 400, " ".join(["word"] * 120)]
    while len(captions) < count:
        length = rng.choice([1, 3, 8, 15, 40, 90])
        tokens = [rng.choice(WORDS) if rng.random() < 0.75 else rng.choice(EXTRAS) for _ in range(length)]
        text = rng.choice([" ", "", "  "]).join(tokens)
        if rng.random() < 0.3:
            text = text.upper() if rng.random() < 0.5 else text.title()
        captions.append(text)
    return captions


def test_tokens_identical_to_openclip_simple_tokenizer(tokenize):
    captions = varied_captions(6000)
    ours = tokenize(captions)
    theirs = open_clip.tokenizer.SimpleTokenizer()(captions)
    mismatched = [captions[i] for i in range(len(captions)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"{len(mismatched)} captions differ, e.g. {mismatched[:3]!r}"


def test_special_ids_vocab_and_padding(tokenize):
    assert len(tokenize.encoder) == 49408
    assert (tokenize.sot_token_id, tokenize.eot_token_id) == (49406, 49407)
    row = tokenize("a dog")[0]
    assert row.shape == (77,) and row.dtype == torch.int64
    assert row[0] == 49406 and row[3] == 49407 and (row[4:] == 0).all()
    assert tokenize("")[0, :2].tolist() == [49406, 49407]


def test_a_tokenizer_for_a_model_name_has_its_context_length_as_openclips_get_tokenizer():
    assert clip_core.get_tokenizer("ViT-B-32") is clip_core.get_tokenizer(77), "built once, shared"
    assert clip_core.get_tokenizer("tiny").context_length == clip_core.get_config("tiny").text.context_length
    with pytest.raises(ValueError, match="unknown model name 'ViT-Z-99'"):
        clip_core.get_tokenizer("ViT-Z-99")


def test_truncation_keeps_eot(tokenize):
    row = tokenize("word " * 200)[0]
    assert row[0] == 49406 and row[-1] == 49407 and (row[1:-1] != 0).all()
    assert tokenize(["a b c d"], context_length=4)[0].tolist() == [49406, tokenize.encode("a")[0],
                                                                    tokenize.encode("b")[0], 49407]


def test_long_words_tokenize_like_openclip_from_a_prefix(tokenize):
    """A text's first ids come from as much of a long "word" as they need (BPE is quadratic in a word's
    length: 1,000 random letters took ~100 ms of a server's CPU for 75 ids); the ids are the same."""
    rng = random.Random(1)
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(100, 1000)))
             for alphabet in ("abcdefghijklmnopqrstuvwxyz", "ab", "xyz0123", "aeiouéü日本") for _ in range(40)]
    texts += [f"a photo of {text}" for text in texts[::7]]
    assert torch.equal(tokenize(texts), open_clip.tokenizer.SimpleTokenizer()(texts))
    assert tokenize.encode(texts[0], max_ids=5) == tokenize.encode(texts[0])[:5]


def test_cleaning_fixes_mojibake_html_and_whitespace():
    assert clean_text("  Caf\u00c3\u00a9 &amp;amp;  Bar\n\tBAZ ") == "café & bar baz"


def test_decode_inverts_encode(tokenize):
    assert tokenize.decode(tokenize("A small red Triangle!")[0]) == "a small red triangle !"
    # the token `!` is id 0, as the padding is: only the end token says where the text stops
    row = tokenize('wow!"#')[0]
    assert 0 in row[: int((row == tokenize.eot_token_id).nonzero()[0])].tolist()
    assert tokenize.decode(row) == 'wow !"#'


def test_non_string_input_is_a_clear_error(tokenize):
    with pytest.raises(TypeError, match="text 1 is a int"):
        tokenize(["ok", 3])
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        clip_core.Tokenizer(context_length=1)
