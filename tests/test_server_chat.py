"""Against the real tritonserver: the chat ensembles, streaming, in-flight batching, cancellation."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtriton.spec import ModelSpec
from clients.embed import embed
from clients.errors import InvalidInputError
from clients.llm import Answer, ChatClient, Sampling
from mmtriton.llm.detokenize import REPLACEMENT
from mmtriton.serving.server import TritonServer


class Reference:
    """Hugging Face transformers greedy decoding of the bundle's LLM, one request at a time."""

    def __init__(self, bundle_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.bundle = json.loads((bundle_dir / "bundle.json").read_text())
        self.tokenizer = AutoTokenizer.from_pretrained(bundle_dir / "llm")
        self.model = AutoModelForCausalLM.from_pretrained(bundle_dir / "llm").eval()
        self.vocab_size = self.bundle["vocab_size"]
        self.end_id = self.bundle["token_ids"]["end"]

    def prompt_ids(self, text: str, media: list[tuple[str, np.ndarray]]) -> tuple[list[int], np.ndarray | None]:
        """Chat template, then each placeholder expanded to fake ids; written here independently."""
        placeholders = "".join(f"{token}\n" for token, _ in media)
        ids = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": placeholders + text}], add_generation_prompt=True, return_dict=False
        )
        out, rows, fake = [], [], self.vocab_size
        for token_id in ids:
            match = [emb for token, emb in media if self.tokenizer.convert_tokens_to_ids(token) == token_id]
            if match:
                out += list(range(fake, fake + len(match[0])))
                fake += len(match[0])
                rows.append(match[0])
            else:
                out.append(token_id)
        return out, (np.concatenate(rows) if rows else None)

    def greedy(self, ids: list[int], table: np.ndarray | None, max_new_tokens: int) -> list[int]:
        """Greedy tokens; cut before the first end id, as the engine (like TensorRT-LLM) returns them."""
        emb = self.model.get_input_embeddings()
        with torch.no_grad():
            ids_t = torch.tensor(ids)
            embeds = emb(ids_t.clamp(max=self.vocab_size - 1))
            if table is not None:
                fake = ids_t >= self.vocab_size
                embeds[fake] = torch.from_numpy(table.astype(np.float32))[ids_t[fake] - self.vocab_size]
            self.model.generation_config.eos_token_id = None
            out = self.model.generate(
                inputs_embeds=embeds[None],
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.bundle["token_ids"]["pad"],
            )[0].tolist()
        return out[: out.index(self.end_id)] if self.end_id in out else out


@pytest.fixture(scope="module")
def reference(bundle_dir: Path) -> Reference:
    return Reference(bundle_dir)


def _visible(text: str) -> str:
    # A stream may end inside a multi-byte character: those bytes are never sent.
    return text.rstrip(REPLACEMENT)


def test_text_only_parity(client: ChatClient, reference: Reference) -> None:
    for prompt, n in [("Hello there, how are you?", 24), ("naïve café 日本語", 17)]:
        answer = client.generate(prompt, sampling=Sampling(max_tokens=n))
        ids, _ = reference.prompt_ids(prompt, [])
        assert answer.num_input_tokens == len(ids)
        assert answer.token_ids == reference.greedy(ids, None, n)
        assert answer.num_output_tokens == len(answer.token_ids)
        full = reference.tokenizer.decode(answer.token_ids, skip_special_tokens=True)
        assert answer.text == _visible(full)


def test_image_audio_parity(client: ChatClient, reference: Reference, grpc_url: str, media: tuple[bytes, bytes]) -> None:
    image, audio = media
    # The prompt-table rows the chat ensemble computes, taken from the server's own encoders.
    rows = embed(grpc_url, image=image, audio=audio)
    prompt = "What is in the picture and the clip?"
    answer = client.generate(prompt, image=image, audio=audio, sampling=Sampling(max_tokens=20))
    ids, table = reference.prompt_ids(
        prompt, [("<image>", rows["image_embeddings"]), ("<audio>", rows["audio_embeddings"])]
    )
    assert answer.num_input_tokens == len(ids)
    assert answer.token_ids == reference.greedy(ids, table, 20)
    assert answer.text == _visible(reference.tokenizer.decode(answer.token_ids, skip_special_tokens=True))


@pytest.mark.parametrize("which", ["image", "audio"])
def test_single_media_ensembles(client: ChatClient, reference: Reference, grpc_url: str, media: tuple[bytes, bytes], which: str) -> None:
    data = {"image": media[0], "audio": media[1]}[which]
    rows = embed(grpc_url, **{which: data})[f"{which}_embeddings"]
    answer = client.generate("Tell me.", **{which: data}, sampling=Sampling(max_tokens=10))
    ids, table = reference.prompt_ids("Tell me.", [(f"<{which}>", rows)])
    assert answer.token_ids == reference.greedy(ids, table, 10)


def _metric(server: TritonServer, name: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    match = re.search(rf"^{name}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


def test_in_flight_batching(client: ChatClient, reference: Reference, server: TritonServer, media: tuple[bytes, bytes], grpc_url: str) -> None:
    """16 concurrent streams of different lengths each get their own tokens; the engine batched them."""
    rows = embed(grpc_url, image=media[0])["image_embeddings"]
    jobs = []
    for i in range(16):
        prompt = f"Request number {i}: " + "word " * (i % 5)
        jobs.append((prompt, 8 + 3 * i, media[0] if i % 4 == 0 else None))

    def run(job: tuple) -> Answer:
        prompt, n, image = job
        return client.generate(prompt, image=image, sampling=Sampling(max_tokens=n))

    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(run, jobs))
    for (prompt, n, image), answer in zip(jobs, answers):
        ids, table = reference.prompt_ids(prompt, [("<image>", rows)] if image is not None else [])
        assert answer.token_ids == reference.greedy(ids, table, n), prompt
    assert _metric(server, "mmtriton_engine_step_batch_size_max") > 1
    steps = _metric(server, "mmtriton_engine_steps_total")
    assert _metric(server, "mmtriton_engine_step_sequences_total") > steps  # mean batch above 1


def _wait_until_idle(server: TritonServer, deadline_s: float = 30.0) -> float:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if _metric(server, "mmtriton_engine_requests_in_flight") == 0:
            return 0.0
        time.sleep(0.25)
    return _metric(server, "mmtriton_engine_requests_in_flight")


def test_cancelled_stream_frees_its_slot(client: ChatClient, server: TritonServer, reference: Reference) -> None:
    received = 0
    stream = client.stream("Tell me a very long story.", sampling=Sampling(max_tokens=256))
    for chunk in stream:
        received += len(chunk.token_ids)
        if received >= 3:
            break
    stream.close()  # stops the gRPC stream with cancel_requests=True
    assert _wait_until_idle(server) == 0
    # A later request completes normally.
    answer = client.generate("After the cancel.", sampling=Sampling(max_tokens=6))
    ids, _ = reference.prompt_ids("After the cancel.", [])
    assert answer.token_ids == reference.greedy(ids, None, 6)


def test_stop_input_cancels_a_running_request(client: ChatClient, server: TritonServer) -> None:
    rid = uuid.uuid4().hex
    stream = client.stream("Another long story.", sampling=Sampling(max_tokens=256), request_id=rid)
    got = [next(stream)]
    client.stop(rid)
    got += list(stream)
    assert sum(len(c.token_ids) for c in got) < 256
    assert _wait_until_idle(server) == 0


@pytest.mark.parametrize(
    ("prompt", "sampling", "message"),
    [
        ("word " * 1500, Sampling(max_tokens=8), "input 'text_input': prompt is"),
        ("hi", Sampling(max_tokens=0), "input 'max_tokens': 0 is outside 1..256"),
        ("hi", Sampling(max_tokens=1000), "input 'max_tokens': 1000 is outside 1..256"),
        ("hi", Sampling(max_tokens=4, temperature=-0.5), "input 'temperature'"),
        ("hi", Sampling(max_tokens=4, top_p=2.0), "input 'top_p'"),
        ("hi", Sampling(max_tokens=4, top_k=-1), "input 'top_k'"),
        ("look at <image>", Sampling(max_tokens=4), "contains <image> but no image was sent"),
    ],
)
def test_bad_requests_get_invalid_argument(client: ChatClient, spec: ModelSpec, prompt: str, sampling: Sampling, message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        client.generate(prompt, sampling=sampling)


def test_bad_image_in_chat_names_the_input(client: ChatClient) -> None:
    with pytest.raises(InvalidInputError, match="input 'image': not a JPEG/PNG/WebP image"):
        client.generate("What is this?", image=b"definitely not an image", sampling=Sampling(max_tokens=4))


def test_http_generate_stream_matches_grpc(server: TritonServer, client: ChatClient, media: tuple[bytes, bytes]) -> None:
    http = ChatClient(server.http_url, protocol="http")
    prompt, sampling = "Compare the protocols, café.", Sampling(max_tokens=16)
    for kwargs in ({}, {"image": media[0], "audio": media[1]}):
        grpc_answer = client.generate(prompt, sampling=sampling, **kwargs)
        http_answer = http.generate(prompt, sampling=sampling, **kwargs)
        assert http_answer.token_ids == grpc_answer.token_ids
        assert http_answer.text == grpc_answer.text
    # Non-streaming: one response with the whole answer, over both protocols.
    text_only = client.generate(prompt, sampling=sampling)
    for c in (client, http):
        whole = c.generate(prompt, sampling=sampling, stream=False)
        assert whole.token_ids == text_only.token_ids and whole.text == text_only.text


def test_stop_words_end_the_answer(client: ChatClient, reference: Reference) -> None:
    free = client.generate("Stop words test", sampling=Sampling(max_tokens=30))
    tok = reference.tokenizer
    # A stretch the model really produces whose text tokenizes back to the same ids.
    candidates = [
        free.token_ids[i : i + n]
        for n in (2, 1)
        for i in range(2, len(free.token_ids) - n)
        if REPLACEMENT not in tok.decode(free.token_ids[i : i + n])
        and tok.encode(tok.decode(free.token_ids[i : i + n]), add_special_tokens=False) == free.token_ids[i : i + n]
    ]
    assert candidates, f"no usable stop sequence in {free.token_ids}"
    stop_ids = candidates[0]
    stopped = client.generate("Stop words test", sampling=Sampling(max_tokens=30, stop_words=(tok.decode(stop_ids),)))
    first = next(i for i in range(len(free.token_ids)) if free.token_ids[i : i + len(stop_ids)] == stop_ids)
    # Generation ends right after the first occurrence; the stop sequence is kept (TensorRT-LLM behaviour).
    assert stopped.token_ids == free.token_ids[: first + len(stop_ids)]
    assert len(stopped.token_ids) < len(free.token_ids)


def test_readme_commands(server: TritonServer, grpc_url: str, tmp_path: Path) -> None:
    """The README's chat CLI line and its curl body for generate_stream."""
    import subprocess
    import sys

    from mmtriton.media.samples import write_samples
    from tests.conftest import ROOT

    image, audio = write_samples(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "clients", "chat", "--url", grpc_url, "--image", str(image), "--audio", str(audio),
         "--max-tokens", "8", "Describe this"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    )
    assert re.search(r"\[\d+ prompt tokens, \d+ output tokens, TTFT \d+ ms", out.stderr), out.stderr
    body = json.dumps({"id": "req-1", "text_input": "Hello", "max_tokens": 16, "stream": True}).encode()
    request = urllib.request.Request(f"http://{server.http_url}/v2/models/chat_text/generate_stream", data=body)
    with urllib.request.urlopen(request, timeout=60) as resp:
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]
    assert events and all("text_output" in e for e in events)


def test_ignore_eos_runs_to_max_tokens(client: ChatClient, reference: Reference) -> None:
    """Find a prompt the model ends early, then ask again with ignore_eos."""
    for i in range(40):
        prompt = f"Prompt {i} that may end early"
        free = client.generate(prompt, sampling=Sampling(max_tokens=48))
        if free.num_output_tokens < 48:
            break
    else:
        pytest.skip("no prompt among 40 made the tiny model emit its end token")
    full = client.generate(prompt, sampling=Sampling(max_tokens=48, ignore_eos=True))
    assert full.num_output_tokens == 48
    assert full.token_ids[: len(free.token_ids)] == free.token_ids
    assert full.token_ids[len(free.token_ids)] == reference.end_id
