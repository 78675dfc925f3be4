"""The chat ensembles' ``messages`` input, in-process: the preprocessing model's conversation rendering."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients.llm import Sampling, conversation_json, request_values
from mmtriton.contract import CHAT_INPUTS, CHAT_MESSAGES
from mmtriton.llm.prompting import PromptBuilder
from mmtriton.contract import InputError


def _rows(n: int, hidden: int, value: float) -> np.ndarray:
    return np.full((n, hidden), value, dtype=np.float16)


def test_one_user_turn_renders_like_text_input(builder: PromptBuilder) -> None:
    image, audio = _rows(3, builder.hidden_size, 0.5), _rows(2, builder.hidden_size, -0.5)
    plain = builder.build("Describe both.", image, audio)
    conv = builder.build_conversation(
        conversation_json([{"role": "user", "content": [{"type": "image"}, {"type": "audio"}, {"type": "text", "text": "Describe both."}]}]),
        image,
        audio,
    )
    assert conv.input_ids.tolist() == plain.input_ids.tolist()
    assert np.array_equal(conv.prompt_table, plain.prompt_table)


def test_turns_are_rendered_once_with_media_where_the_parts_were(builder: PromptBuilder) -> None:
    image, audio = _rows(3, builder.hidden_size, 1.0), _rows(2, builder.hidden_size, 2.0)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "First"}, {"type": "image"}]},
        {"role": "assistant", "content": "Seen."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Then"}]},
    ]
    prompt = builder.build_conversation(conversation_json(messages), image, audio)
    ids = prompt.input_ids.tolist()
    v = builder.vocab_size
    # The image rows come before the audio rows, each in its own message.
    assert ids.count(v) == 1 and ids.index(v) < ids.index(v + 3)
    expected_text = builder.tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "First\n<image>"},
            {"role": "assistant", "content": "Seen."},
            {"role": "user", "content": "<audio>\nThen"},
        ],
        add_generation_prompt=True,
        tokenize=False,
    )
    text_ids = [t for t in ids if t < v]
    assert builder.tokenizer.decode(text_ids) == expected_text.replace("<image>", "").replace("<audio>", "")
    assert prompt.prompt_table.shape == (5, builder.hidden_size)
    assert prompt.text_tokens == len(text_ids)


@pytest.mark.parametrize(
    ("payload", "image", "message"),
    [
        ("not json", False, "input 'messages': not valid JSON"),
        (json.dumps([{"role": "user", "content": "x"}]), False, 'must be a JSON object {"messages": [...]}'),
        (conversation_json([{"role": "tool", "content": "x"}]), False, "messages[0]: role 'tool' is not one of"),
        (conversation_json([{"role": "user", "content": "see <image>"}]), False, "messages[0].content: contains <image>; send media as image/audio parts"),
        (conversation_json([{"role": "user", "content": [{"type": "video"}]}]), False, "messages[0].content[0]: part type 'video'"),
        (conversation_json([{"role": "user", "content": [{"type": "image"}]}]), False, "has an image part but no image was sent"),
        (conversation_json([{"role": "user", "content": "hi"}]), True, "an image was sent but no message has an image part"),
        (conversation_json([{"role": "user", "content": [{"type": "image"}, {"type": "image"}]}]), True, "has 2 image parts; one image per request"),
        (conversation_json([{"role": "user", "content": "word " * 1500}]), False, "input 'messages': prompt is"),
    ],
)
def test_conversation_errors(builder: PromptBuilder, payload: str, image: bool, message: str) -> None:
    rows = _rows(2, builder.hidden_size, 0.0) if image else None
    with pytest.raises(InputError) as err:
        builder.build_conversation(payload, rows)
    assert message in str(err.value)


def test_enable_thinking_reaches_the_template(builder: PromptBuilder, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    real = builder.tokenizer.apply_chat_template

    def spy(*args: object, **kwargs: object) -> object:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(builder.tokenizer, "apply_chat_template", spy)
    builder.build_conversation(conversation_json([{"role": "user", "content": "hi"}], enable_thinking=False))
    assert seen["enable_thinking"] is False


def test_request_values_carry_either_text_or_messages() -> None:
    assert CHAT_MESSAGES in CHAT_INPUTS
    conv = conversation_json([{"role": "user", "content": "hi"}])
    values = request_values(None, None, None, Sampling(max_tokens=4), True, messages=conv)
    assert "text_input" not in values and values[CHAT_MESSAGES].reshape(-1)[0] == conv.encode()
    with pytest.raises(Exception, match="either a prompt or messages"):
        request_values("hi", None, None, Sampling(), True, messages=conv)
