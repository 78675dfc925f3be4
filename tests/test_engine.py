"""Tests for the in-flight batching engine (no Triton server).

References come from a separate Hugging Face model instance decoding one request at
a time with ``generate(do_sample=False)``; its EOS is disabled so it always produces
exactly ``max_new_tokens`` tokens, and the engine is given ``end_id=-1`` to match.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedModel

from mmtriton.llm.generation import GenerationRequest
from mmtriton.llm.transformers_engine import Engine

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "build" / "bundles" / "tiny-mm"
MAX_BATCH = 8
MAX_INPUT = 1024
MAX_OUTPUT = 256
CAPACITY = 64
STREAM_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def bundle() -> Path:
    """The tiny bundle: reused if present, else built."""
    if not (BUNDLE / "bundle.json").is_file() or not (BUNDLE / "llm" / "config.json").is_file():
        from build_engines.bundle import build_bundle
        from mmtriton.spec import load_spec

        build_bundle(load_spec(ROOT / "build_engines" / "specs" / "tiny.toml"), BUNDLE)
    return BUNDLE


@pytest.fixture(scope="module")
def manifest(bundle: Path) -> dict:
    return json.loads((bundle / "bundle.json").read_text())


@pytest.fixture(scope="module")
def vocab(manifest: dict) -> int:
    return int(manifest["vocab_size"])


@pytest.fixture(scope="module")
def hidden(manifest: dict) -> int:
    return int(manifest["llm_hidden_size"])


@pytest.fixture(scope="module")
def ref_model(bundle: Path) -> PreTrainedModel:
    """An independent model instance for references, with EOS stopping disabled."""
    model = AutoModelForCausalLM.from_pretrained(bundle / "llm").eval()
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def engine(bundle: Path) -> Engine:
    eng = Engine(
        bundle / "llm",
        max_batch_size=MAX_BATCH,
        max_input_len=MAX_INPUT,
        max_output_len=MAX_OUTPUT,
        prompt_table_capacity=CAPACITY,
    )
    eng.start()
    yield eng
    eng.stop()


def greedy_reference(
    model: PreTrainedModel, input_ids: list[int], n: int, table: np.ndarray | None = None
) -> list[int]:
    """``n`` greedy tokens from HF ``generate``; fake ids are embedded from ``table`` independently."""
    config = GenerationConfig(do_sample=False, max_new_tokens=n, pad_token_id=2)
    vocab = model.config.vocab_size
    with torch.no_grad():
        if table is None:
            out = model.generate(torch.tensor([input_ids]), generation_config=config)
            tokens = out[0, len(input_ids) :].tolist()
        else:
            weight = model.get_input_embeddings().weight
            rows = [
                weight[i] if i < vocab else torch.from_numpy(table[i - vocab]).to(weight.dtype) for i in input_ids
            ]
            embeds = torch.stack(rows)[None]
            mask = torch.ones(1, len(input_ids), dtype=torch.long)
            out = model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
            tokens = out[0].tolist()
    assert len(tokens) == n
    return tokens


def collect(engine: Engine, request_id: str) -> tuple[list[int], int]:
    """All tokens of a stream and the number of items it came in."""
    tokens: list[int] = []
    items = 0
    for item in engine.stream(request_id):
        assert item, "stream items must not be empty"
        tokens.extend(item)
        items += 1
    return tokens, items


def random_table(rng: np.random.Generator, rows: int, hidden: int) -> np.ndarray:
    return (rng.standard_normal((rows, hidden)) * 0.5).astype(np.float16)


def random_prompt(rng: np.random.Generator, vocab: int, length: int, table_rows: int = 0) -> list[int]:
    """Text ids with, if ``table_rows``, every fake id spliced in (some twice)."""
    ids = rng.integers(3, vocab, size=length).tolist()
    if table_rows:
        fake = [vocab + i for i in range(table_rows)] + [vocab + int(rng.integers(0, table_rows))]
        at = int(rng.integers(0, len(ids) + 1))
        ids = ids[:at] + fake + ids[at:]
    return ids


def test_text_greedy_parity(engine: Engine, ref_model: PreTrainedModel, vocab: int) -> None:
    rng = np.random.default_rng(1)
    for length, n in [(1, 12), (5, 20), (17, 9), (60, 24)]:
        prompt = random_prompt(rng, vocab, length)
        rid = engine.submit(GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1))
        tokens, _ = collect(engine, rid)
        assert tokens == greedy_reference(ref_model, prompt, n), f"prompt length {length}"


def test_multimodal_parity(engine: Engine, ref_model: PreTrainedModel, vocab: int, hidden: int) -> None:
    rng = np.random.default_rng(2)
    for length, rows, n in [(6, 5, 16), (20, 12, 10)]:
        table = random_table(rng, rows, hidden)
        prompt = random_prompt(rng, vocab, length, rows)
        rid = engine.submit(
            GenerationRequest(
                input_ids=prompt, max_new_tokens=n, end_id=-1, prompt_table=table, prompt_vocab_size=rows
            )
        )
        tokens, _ = collect(engine, rid)
        assert tokens == greedy_reference(ref_model, prompt, n, table)
    # Same fake ids, other table: the output follows the request's own table.
    prompt = [0, 5, vocab, vocab + 1, vocab + 2, 9]
    outs = []
    for _ in range(2):
        table = random_table(rng, 3, hidden)
        rid = engine.submit(GenerationRequest(input_ids=prompt, max_new_tokens=8, end_id=-1, prompt_table=table))
        tokens, _ = collect(engine, rid)
        assert tokens == greedy_reference(ref_model, prompt, 8, table)
        outs.append(tokens)
    assert outs[0] != outs[1]
    assert engine.free_prompt_table_rows == CAPACITY


def test_prefix_cache_never_mixes_tables(
    engine: Engine, ref_model: PreTrainedModel, vocab: int, hidden: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Prompts longer than one KV page hit transformers' prefix cache; table rows reused by a
    later request (same rows, same contract ids, other content) must not be served from it."""
    rng = np.random.default_rng(5)
    rows = 48
    prompt = [0] + [vocab + i for i in range(rows)] + rng.integers(3, vocab, size=220).tolist()
    text_prompt = rng.integers(3, vocab, size=300).tolist()
    with caplog.at_level(logging.DEBUG, logger="ContinuousBatchingLogger"):
        for table in (random_table(rng, rows, hidden), random_table(rng, rows, hidden), None):
            ids = text_prompt if table is None else prompt
            for _ in range(2 if table is None else 1):
                rid = engine.submit(GenerationRequest(input_ids=ids, max_new_tokens=6, end_id=-1, prompt_table=table))
                assert collect(engine, rid)[0] == greedy_reference(ref_model, ids, 6, table)
    matches = [r.getMessage() for r in caplog.records if "prefix match" in r.getMessage()]
    assert len(matches) == 1, matches  # only the repeated text prompt reused cached KV


def test_concurrent_requests_in_flight(
    engine: Engine, ref_model: PreTrainedModel, vocab: int, hidden: int
) -> None:
    rng = np.random.default_rng(3)
    cases = []
    for k in range(16):
        rows = int(rng.integers(6, 13)) if k % 2 else 0  # 8 tables, ~72 rows in all > CAPACITY: rows get reused
        table = random_table(rng, rows, hidden) if rows else None
        prompt = random_prompt(rng, vocab, int(rng.integers(1, 80)), rows)
        n = int(rng.integers(8, 40))
        cases.append((prompt, n, table, greedy_reference(ref_model, prompt, n, table)))

    engine.reset_step_stats()
    ids = [
        engine.submit(GenerationRequest(input_ids=p, max_new_tokens=n, end_id=-1, prompt_table=t))
        for p, n, t, _ in cases
    ]
    assert engine.num_pending > 0  # 16 requests, MAX_BATCH slots: the rest wait for admission
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        results = list(pool.map(lambda rid: collect(engine, rid), ids, timeout=STREAM_TIMEOUT_S))

    for (prompt, n, table, expected), (tokens, items) in zip(cases, results):
        assert tokens == expected, f"prompt length {len(prompt)}, table {None if table is None else table.shape}"
        assert items > 1  # streamed, not delivered in one piece
    hist = engine.step_batch_sizes()
    assert 1 < engine.max_batch_size_seen <= MAX_BATCH, hist
    assert max(hist) == engine.max_batch_size_seen
    assert engine.free_prompt_table_rows == CAPACITY
    assert engine.num_in_flight == 0 and engine.num_pending == 0


def test_cancel_frees_slot_and_rows(bundle: Path, ref_model: PreTrainedModel, vocab: int, hidden: int) -> None:
    rng = np.random.default_rng(4)
    rows = 8
    with Engine(
        bundle / "llm", max_batch_size=1, max_input_len=64, max_output_len=MAX_OUTPUT, prompt_table_capacity=rows
    ) as eng:
        long_prompt = random_prompt(rng, vocab, 10, rows)
        table_a = random_table(rng, rows, hidden)
        a = eng.submit(
            GenerationRequest(input_ids=long_prompt, max_new_tokens=MAX_OUTPUT, end_id=-1, prompt_table=table_a)
        )
        stream_a = eng.stream(a)
        first = next(stream_a)
        assert first and eng.free_prompt_table_rows == 0 and eng.num_in_flight == 1

        # B needs every table row and the only slot: it waits behind A.
        table_b = random_table(rng, rows, hidden)
        prompt_b = random_prompt(rng, vocab, 7, rows)
        b = eng.submit(GenerationRequest(input_ids=prompt_b, max_new_tokens=10, end_id=-1, prompt_table=table_b))
        # C is pending too; cancelling it before admission just drops it.
        c = eng.submit(GenerationRequest(input_ids=[0, 5, 6], max_new_tokens=5, end_id=-1))
        assert eng.num_pending == 2
        eng.cancel(c)
        assert eng.num_pending == 1

        eng.cancel(a)
        rest = [t for item in stream_a for t in item]
        assert len(first) + len(rest) < MAX_OUTPUT  # the stream ended early

        tokens_b, _ = collect(eng, b)
        assert tokens_b == greedy_reference(ref_model, prompt_b, 10, table_b)
        assert eng.free_prompt_table_rows == rows
        assert eng.num_in_flight == 0 and eng.num_pending == 0

        # Closing a stream early cancels its request as well.
        d = eng.submit(GenerationRequest(input_ids=[0, 11, 12, 13], max_new_tokens=MAX_OUTPUT, end_id=-1))
        stream_d = eng.stream(d)
        next(stream_d)
        stream_d.close()
        assert eng.num_in_flight == 0
        e = eng.submit(GenerationRequest(input_ids=[0, 9, 10], max_new_tokens=6, end_id=-1))
        assert collect(eng, e)[0] == greedy_reference(ref_model, [0, 9, 10], 6)


def _req(**kw: object) -> GenerationRequest:
    base = dict(input_ids=[0, 5, 6], max_new_tokens=4, end_id=-1)
    base.update(kw)
    return GenerationRequest(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda v, h: _req(input_ids=[]), "input_ids is empty"),
        (lambda v, h: _req(input_ids=[5] * (MAX_INPUT + 1)), "more than max_input_len"),
        (lambda v, h: _req(input_ids=[0, -3]), "negative id"),
        (lambda v, h: _req(input_ids=[0, v]), "no prompt_table"),
        (
            lambda v, h: _req(input_ids=[0, v, v + 3], prompt_table=np.zeros((3, h), np.float16)),
            r"fake id \d+ is out of range",
        ),
        (
            lambda v, h: _req(input_ids=[0, v + 2], prompt_table=np.zeros((4, h), np.float16), prompt_vocab_size=2),
            "is out of range",
        ),
        (
            lambda v, h: _req(input_ids=[0, v], prompt_table=np.zeros((4, h), np.float16), prompt_vocab_size=5),
            "prompt_vocab_size 5",
        ),
        (lambda v, h: _req(input_ids=[0, v], prompt_table=np.zeros((4, h + 1), np.float16)), "hidden size"),
        (
            lambda v, h: _req(
                input_ids=[v + i for i in range(CAPACITY + 1)],
                prompt_table=np.zeros((CAPACITY + 1, h), np.float16),
            ),
            "can never fit",
        ),
        (lambda v, h: _req(max_new_tokens=0), "max_new_tokens 0"),
        (lambda v, h: _req(max_new_tokens=MAX_OUTPUT + 1), f"max_new_tokens {MAX_OUTPUT + 1}"),
        (lambda v, h: _req(stop_words=[[3], []]), "empty sequence"),
        (lambda v, h: _req(temperature=-1.0), "temperature"),
        (lambda v, h: _req(top_p=1.5), "top_p"),
    ],
)
def test_invalid_requests(engine: Engine, vocab: int, hidden: int, make, message: str) -> None:
    before = (engine.num_pending, engine.num_in_flight, engine.free_prompt_table_rows)
    with pytest.raises(ValueError, match=message):
        engine.submit(make(vocab, hidden))
    assert (engine.num_pending, engine.num_in_flight, engine.free_prompt_table_rows) == before


def test_stop_words_and_end_id(engine: Engine, ref_model: PreTrainedModel, vocab: int) -> None:
    """Stop words end generation after the match and are kept; end_id ends it and is dropped."""
    prompt = [0, 17, 230, 44, 91, 5]
    n = 24
    ref = greedy_reference(ref_model, prompt, n)

    def run(**kw: object) -> list[int]:
        kw.setdefault("end_id", -1)
        rid = engine.submit(GenerationRequest(input_ids=prompt, max_new_tokens=n, **kw))
        return collect(engine, rid)[0]

    def first_match_end(word: list[int]) -> int:
        return next(i for i in range(len(word), n + 1) if ref[i - len(word) : i] == word)

    two = ref[6:8]
    assert run(stop_words=[two]) == ref[: first_match_end(two)]
    one = [ref[3]]
    pairs = set(zip(ref, ref[1:]))
    absent = next([a, b] for a in range(3, vocab) for b in range(3, vocab) if (a, b) not in pairs)
    assert run(stop_words=[absent, one]) == ref[: first_match_end(one)]
    assert run(stop_words=[absent]) == ref

    # end_id: generation stops at its first occurrence, which is not returned.
    end = ref[10]
    assert run(end_id=end) == ref[: ref.index(end)]

    # end_id=None uses the model's EOS ids: find a prompt whose greedy output hits one.
    eos_ids = engine.default_eos_ids
    assert eos_ids
    rng = np.random.default_rng(6)
    candidates = torch.from_numpy(rng.integers(3, vocab, size=(256, 8)))
    with torch.no_grad():
        out = ref_model.generate(candidates, generation_config=GenerationConfig(do_sample=False, max_new_tokens=n))
    hits = [(k, row) for k, row in enumerate(out[:, 8:].tolist()) if eos_ids & set(row)]
    if not hits:
        pytest.skip("no random prompt reaches an EOS id with these weights")
    k, row = hits[0]
    eos_prompt = candidates[k].tolist()
    expected = row[: min(i for i, t in enumerate(row) if t in eos_ids)]
    rid = engine.submit(GenerationRequest(input_ids=eos_prompt, max_new_tokens=n, end_id=None))
    assert collect(engine, rid)[0] == expected


def test_sampling_mixed_with_greedy(engine: Engine, ref_model: PreTrainedModel, vocab: int) -> None:
    """Per-request sampling params: sampled and greedy requests share batches; greedy stays exact."""
    prompt = [0, 33, 120, 7, 400]
    n = 30
    ref = greedy_reference(ref_model, prompt, n)
    requests = [
        GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1, temperature=1.5, top_k=50, top_p=0.95),
        GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1, temperature=2.0, top_k=1),  # greedy
        GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1, temperature=0.0, top_k=40),  # greedy
        GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1, temperature=5.0),  # unset k/p: greedy
        GenerationRequest(input_ids=prompt, max_new_tokens=n, end_id=-1, temperature=3.0, top_p=1.0),
    ]
    ids = [engine.submit(r) for r in requests]
    with ThreadPoolExecutor(max_workers=len(ids)) as pool:
        outs = [tokens for tokens, _ in pool.map(lambda rid: collect(engine, rid), ids, timeout=STREAM_TIMEOUT_S)]
    assert outs[1] == ref and outs[2] == ref and outs[3] == ref
    for sampled in (outs[0], outs[4]):
        assert len(sampled) == n and all(0 <= t < vocab for t in sampled)
    assert outs[4] != ref  # temperature 3 over the full vocabulary: 30 argmax picks in a row is implausible


def test_a_seed_is_refused_where_it_cannot_be_honoured(engine: Engine, ref_model: PreTrainedModel) -> None:
    """transformers CB samples from one process-wide generator: a sampled request with a seed is
    refused with an error naming the input; a greedy one keeps its exact answer (the seed is moot)."""
    prompt = [0, 33, 120, 7, 400]
    with pytest.raises(ValueError, match=r"^input 'seed': per-request seeds are not supported by this engine"):
        engine.submit(GenerationRequest(input_ids=prompt, max_new_tokens=4, end_id=-1, temperature=0.8, top_p=0.9, seed=7))
    rid = engine.submit(GenerationRequest(input_ids=prompt, max_new_tokens=6, end_id=-1, temperature=0.0, seed=7))
    assert collect(engine, rid)[0] == greedy_reference(ref_model, prompt, 6)


def test_submit_requires_running_engine(bundle: Path) -> None:
    eng = Engine(bundle / "llm", max_batch_size=1, max_input_len=8, max_output_len=4, prompt_table_capacity=0)
    with pytest.raises(RuntimeError, match="not running"):
        eng.submit(_req())
    with pytest.raises(KeyError):
        eng.stream("req-missing")


def test_sampling_values_have_one_definition(engine: Engine) -> None:
    """The engine refuses what the preprocessing model refuses, naming the contract's inputs."""
    from mmtriton.contract import InputError
    from mmtriton.llm.prompting import SamplingLimits, check_sampling

    cases = [({"temperature": -0.5}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 1.5}, "top_p"), ({"top_p": -0.1}, "top_p")]
    contract = {"temperature": "temperature", "top_k": "runtime_top_k", "top_p": "runtime_top_p"}
    for values, name in cases:
        with pytest.raises(InputError) as public:
            check_sampling(**{"max_tokens": 4, "temperature": None, "top_k": None, "top_p": None, **values}, limits=SamplingLimits(8))
        with pytest.raises(InputError) as direct:
            engine.submit(GenerationRequest(input_ids=[1, 2], max_new_tokens=4, **values))
        assert public.value.input_name == name and direct.value.input_name == contract[name]
        assert str(public.value).split(": ", 1)[1] == str(direct.value).split(": ", 1)[1]
