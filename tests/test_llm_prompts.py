"""Contract tensors -> engine prompts (mmtriton/llm/vllm_prompts.py), on the tiny bundle's real tensors.

The prompts come from the real ``preprocessing`` logic (chat template, placeholders,
fake ids, prompt table) and the bundle's real input embedding; the reference resolves
every position one at a time in numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtriton.llm.vllm_prompts import EMBEDS_KEY, TOKEN_IDS_KEY, ContractRequest, PromptError, build_prompts
from mmtriton.llm.prompting import PromptBuilder


@pytest.fixture(scope="module")
def bundle(bundle_dir: Path, builder: PromptBuilder) -> dict:
    """The tiny bundle's vocabulary size, its input embedding (FP32) and the prompt builder."""
    from safetensors.numpy import load_file

    info = json.loads((bundle_dir / "bundle.json").read_text())
    weights = load_file(str(bundle_dir / "llm" / "model.safetensors"))
    (name,) = [k for k in weights if k.endswith("embed_tokens.weight")]
    return {"vocab": info["vocab_size"], "weight": weights[name].astype(np.float32), "builder": builder}


def _reference(ids: np.ndarray, table: np.ndarray | None, vocab: int, weight: np.ndarray) -> np.ndarray:
    rows = [weight[i] if i < vocab else table[i - vocab] for i in ids.tolist()]
    return np.stack(rows)


def _media(rows: int, hidden: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, hidden)).astype(np.float16)


def test_mixed_batch_matches_position_by_position_reference(bundle: dict) -> None:
    vocab, weight, builder = bundle["vocab"], bundle["weight"], bundle["builder"]
    hidden = weight.shape[1]
    built = [
        ("text", builder.build("Hello, what is new?")),
        ("image", builder.build("<image> What is in the picture?", _media(7, hidden, 1))),
        ("text2", builder.build("Another text-only question")),
        ("both", builder.build("Describe <image> and then <audio>.", _media(5, hidden, 2), _media(11, hidden, 3))),
        ("audio", builder.build("<audio>", None, _media(4, hidden, 4))),
    ]
    requests = [ContractRequest(name, p.input_ids.tolist(), p.prompt_table) for name, p in built]
    prompts = build_prompts(requests, vocab, torch.from_numpy(weight))
    assert [next(iter(p)) for p in prompts] == [TOKEN_IDS_KEY, EMBEDS_KEY, TOKEN_IDS_KEY, EMBEDS_KEY, EMBEDS_KEY]
    for (name, p), prompt in zip(built, prompts):
        if p.prompt_table is None:
            assert prompt[TOKEN_IDS_KEY] == p.input_ids.tolist(), name
            continue
        embeds = prompt[EMBEDS_KEY]
        assert embeds.shape == (p.input_ids.size, hidden) and embeds.dtype == torch.float32, name
        expected = _reference(p.input_ids, p.prompt_table.astype(np.float32), vocab, weight)
        np.testing.assert_array_equal(embeds.numpy(), expected, err_msg=name)
        # The media rows land exactly where preprocessing put the fake ids, in table order.
        fake = np.flatnonzero(p.input_ids >= vocab)
        np.testing.assert_array_equal(embeds.numpy()[fake], p.prompt_table.astype(np.float32), err_msg=name)


def test_each_request_reads_only_its_own_table(bundle: dict) -> None:
    """Two requests with the same fake ids and different tables get different rows."""
    vocab, weight = bundle["vocab"], torch.from_numpy(bundle["weight"])
    hidden = weight.shape[1]
    ids = [5, vocab, vocab + 1, 9]
    a, b = np.full((2, hidden), 1.0, np.float16), np.full((2, hidden), -2.0, np.float16)
    pa, pb = build_prompts([ContractRequest("a", ids, a), ContractRequest("b", ids, b)], vocab, weight)
    assert torch.equal(pa[EMBEDS_KEY][1:3], torch.ones(2, hidden))
    assert torch.equal(pb[EMBEDS_KEY][1:3], torch.full((2, hidden), -2.0))
    assert torch.equal(pa[EMBEDS_KEY][0], weight[5]) and torch.equal(pb[EMBEDS_KEY][3], weight[9])


def test_embeddings_take_the_weights_dtype(bundle: dict) -> None:
    vocab = bundle["vocab"]
    weight = torch.from_numpy(bundle["weight"]).to(torch.bfloat16)
    (prompt,) = build_prompts([ContractRequest("r", [3, vocab], np.ones((1, weight.shape[1]), np.float16))], vocab, weight)
    assert prompt[EMBEDS_KEY].dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("ids", "rows", "width", "message"),
    [
        ([1, "V+2"], 2, None, "id V+2 selects prompt-table row 2, but the table has 2 rows"),
        (["V"], 0, None, "selects prompt-table row 0, but the table has 0 rows"),
        ([], 0, None, "empty input_ids"),
        ([-1, 3], 0, None, "negative token id -1"),
        (["V"], 1, 3, "prompt_embedding_table has shape (1, 3), expected [rows, H]"),
    ],
)
def test_bad_requests_name_the_request_and_the_limit(bundle: dict, ids: list, rows: int, width: int | None, message: str) -> None:
    vocab, weight = bundle["vocab"], torch.from_numpy(bundle["weight"])
    hidden = weight.shape[1]
    resolved = [vocab + int(i[2:] or 0) if isinstance(i, str) else i for i in ids]
    table = np.zeros((rows, width or hidden), np.float16) if rows or width else None
    good = ContractRequest("good", [1, 2, 3])
    with pytest.raises(PromptError) as err:
        build_prompts([good, ContractRequest("bad-7", resolved, table)], vocab, weight)
    expected = message.replace("V+2", str(vocab + 2)).replace("[rows, H]", f"[rows, {hidden}]")
    assert str(err.value).startswith("request 'bad-7': ") and expected in str(err.value)
