"""Prompt building and streaming detokenization, in-process."""

from __future__ import annotations

import numpy as np
import pytest

from mmtriton.llm.detokenize import REPLACEMENT, DetokenizerStates, IncrementalDetokenizer
from mmtriton.llm.prompting import (
    PromptBuilder,
    SamplingLimits,
    check_sampling,
    parse_stop_words,
    stop_words_tensor,
)
from mmtriton.contract import InputError

TEXT = "Le café naïve — 日本語 🙂 says: hello  world, fine?"


def test_per_token_decoding_would_break_this_text(builder: PromptBuilder) -> None:
    """The test text does split characters across tokens (otherwise the next tests prove nothing)."""
    tok = builder.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_streamed_text_equals_full_decode(builder: PromptBuilder, chunk: int) -> None:
    tok = builder.tokenizer
    ids = tok.encode(TEXT, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(pieces) + detok.flush() == TEXT


@pytest.mark.parametrize("chunk", [2, 3, 5, 8])
@pytest.mark.parametrize("which", ["bundle", "sentencepiece_style"])
def test_chunk_ending_inside_a_character_still_sends_the_whole_characters_before_it(
    builder: PromptBuilder, request: pytest.FixtureRequest, which: str, chunk: int
) -> None:
    """A stream may end on such a chunk (max_tokens): only the unfinished character may be missing."""
    tok = builder.tokenizer if which == "bundle" else request.getfixturevalue("sentencepiece_style")
    ids = tok.encode(TEXT, add_special_tokens=False)
    cuts = [n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith(REPLACEMENT)]
    assert cuts, "the text has no token boundary inside a character"
    checked = 0
    for cut in cuts:
        if cut < chunk:
            continue
        detok = IncrementalDetokenizer(tok)
        head = ids[: cut - chunk]
        text = "".join(detok.push(head[i : i + chunk]) for i in range(0, len(head), chunk))
        text += detok.push(ids[cut - chunk : cut])  # the last chunk: several tokens, ends mid-character
        # Every complete character before the cut: the text of the longest token prefix that
        # ends on a whole character (byte-fallback decoders replace a whole unfinished byte group).
        whole = next(t for k in range(cut, -1, -1) if not (t := tok.decode(ids[:k])).endswith(REPLACEMENT))
        assert text == whole, (cut, text, whole)
        checked += 1
    assert checked


@pytest.fixture(scope="module")
def sentencepiece_style() -> object:
    """A Llama-style tokenizer made here: "▁" word starts, byte fallback, a decoder that strips one leading space.

    Characters without a token (CJK, emoji) become UTF-8 byte tokens, and a lone "▁" at the
    start of a decode loses its space: the two ways chunked decoding goes wrong with such tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for ch in sorted(set("▁" + "".join(c for c in TEXT if ord(c) < 0x2000 and c != " "))):
        vocab.setdefault(ch, len(vocab))
    merges = [("▁", "s"), ("▁s", "a")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_streamed_text_equals_full_decode_with_a_sentencepiece_style_tokenizer(sentencepiece_style, chunk: int) -> None:
    tok = sentencepiece_style
    ids = tok.encode(TEXT, add_special_tokens=False)
    assert tok.decode(ids[:1]) == "" and any(REPLACEMENT in tok.decode([i]) for i in ids)  # both traps are there
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert not any(REPLACEMENT in p for p in pieces)
    assert "".join(pieces) + detok.flush() == TEXT


def test_states_are_kept_per_request(builder: PromptBuilder) -> None:
    tok = builder.tokenizer
    a = tok.encode(TEXT, add_special_tokens=False)
    b = tok.encode("naïve 日本 café", add_special_tokens=False)
    states = DetokenizerStates(tok)
    out = {"a": "", "b": ""}
    for i in range(max(len(a), len(b))):  # interleaved streams
        if i < len(a):
            out["a"] += states.push("a", a[i : i + 1])
        if i < len(b):
            out["b"] += states.push("b", b[i : i + 1])
    assert out == {"a": TEXT, "b": "naïve 日本 café"}


def test_prompt_fake_ids_and_table(builder: PromptBuilder) -> None:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, builder.hidden_size)).astype(np.float16)
    audio = rng.normal(size=(3, builder.hidden_size)).astype(np.float16)
    prompt = builder.build("<audio> then <image> what?", image, audio)
    ids = prompt.input_ids.tolist()
    v = builder.vocab_size
    # Audio comes first in the text, so it takes the first fake ids and the first table rows.
    first = ids.index(v)
    assert ids[first : first + 3] == [v, v + 1, v + 2]
    second = ids.index(v + 3)
    assert ids[second : second + 5] == list(range(v + 3, v + 8))
    np.testing.assert_array_equal(prompt.prompt_table, np.concatenate([audio, image]))
    text_only = builder.build("<audio> then <image> what?".replace("<audio>", "").replace("<image>", ""))
    assert text_only.prompt_table is None and max(text_only.input_ids) < v


def test_media_without_placeholder_goes_first(builder: PromptBuilder) -> None:
    image = np.zeros((2, builder.hidden_size), np.float16)
    prompt = builder.build("describe", image)
    ids = prompt.input_ids.tolist()
    assert ids.index(builder.vocab_size) < ids.index(builder.tokenizer.encode("describe", add_special_tokens=False)[0])


@pytest.mark.parametrize(
    ("text", "image", "message"),
    [
        ("<image> and <image>", True, "input 'text_input': contains 2 <image> placeholders"),
        ("look at <image>", False, "input 'text_input': contains <image> but no image was sent"),
        ("word " * 2000, False, "over the engine's max input length of 1024"),
    ],
)
def test_prompt_errors(builder: PromptBuilder, text: str, image: bool, message: str) -> None:
    emb = np.zeros((4, builder.hidden_size), np.float16) if image else None
    with pytest.raises(InputError, match=message):
        builder.build(text, emb)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "input 'max_tokens': 0 is outside 1..256"),
        ({"max_tokens": 257}, "input 'max_tokens': 257 is outside 1..256"),
        ({"temperature": -1.0}, "input 'temperature': -1.0 must be a finite number >= 0"),
        ({"temperature": float("nan")}, "input 'temperature': nan must be"),
        ({"top_k": -2}, "input 'top_k': -2 must be >= 0"),
        ({"top_p": 1.5}, "input 'top_p': 1.5 must be within"),
    ],
)
def test_sampling_errors(kwargs: dict, message: str) -> None:
    args = {"max_tokens": 8, "temperature": None, "top_k": None, "top_p": None, **kwargs}
    with pytest.raises(InputError, match=message):
        check_sampling(**args, limits=SamplingLimits(max_output_len=256))


def test_stop_words_layout_round_trips() -> None:
    words = [[5, 6], [7], [8, 9, 10]]
    tensor = stop_words_tensor(words)
    assert tensor.tolist() == [[5, 6, 7, 8, 9, 10], [2, 3, 6, -1, -1, -1]]
    assert parse_stop_words(tensor) == words
    assert stop_words_tensor([]).tolist() == [[0], [-1]] and parse_stop_words(stop_words_tensor([])) == []
