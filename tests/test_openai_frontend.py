"""The OpenAI front door (``python -m openai_frontend``) against the real CPU server, loopback only.

The front door runs as its own process, started the way a user starts it. Its answers
are compared with :class:`clients.llm.ChatClient` over gRPC for the same request (greedy,
so they must be equal), and its ``usage`` with the ensembles' own token counts.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bench.triton_stats import metric_sum, scrape_metrics
from clients.embed import embed
from clients.llm import ChatClient, Sampling, conversation_json, request_values
from mmtriton.llm.prompting import PromptBuilder
from mmtriton.media.samples import encode_image, synthetic_image
from mmtriton.serving.server import TritonServer
from tests.bad_inputs import corrupt_png_data
from tests.conftest import ROOT
from tests.helpers.frontdoor import BodyServer, FrontDoor, Listener


@pytest.fixture(scope="module")
def frontend(grpc_url: str, bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FrontDoor]:
    """URL fetching on, with only the name ``localhost`` allowlisted (it resolves to loopback: refused)."""
    door = FrontDoor(grpc_url, bundle_dir, tmp_path_factory.mktemp("frontend"), "--allow-url-fetch", "--url-allow-host", "localhost")
    yield door
    door.stop()


@pytest.fixture(scope="module")
def oai(frontend: FrontDoor) -> "openai.OpenAI":
    import openai

    return openai.OpenAI(base_url=f"{frontend.url}/v1", api_key="EMPTY", max_retries=0, timeout=120)


def _image_part(data: bytes, mime: str = "image/jpeg") -> dict:
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{base64.b64encode(data).decode()}"}}


def _audio_part(data: bytes, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def _ask(oai: "openai.OpenAI", messages: list, stream: bool, **kwargs: object) -> tuple[str, dict, str]:
    """Text, usage and finish reason of one completion through the official client."""
    if not stream:
        out = oai.chat.completions.create(model="tiny-mm", messages=messages, **kwargs)
        assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.model == "tiny-mm"
        return out.choices[0].message.content, out.usage.model_dump(), out.choices[0].finish_reason
    text, usage, finish = "", {}, None
    chunks = oai.chat.completions.create(
        model="tiny-mm", messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
    )
    for chunk in chunks:
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    return text, usage, finish


def _whole_chars(client: ChatClient, builder: PromptBuilder, prompt: str | None, n: int, **kwargs: object) -> int:
    """A ``max_tokens`` up to ``n`` whose greedy answer ends on a whole character.

    Workaround for the server's streaming detokenizer (``mmtriton/llm/detokenize.py``): when a
    coalesced chunk ends inside a multi-byte character, the chunk's complete text before it
    is held back too, and a stream that ends there never sends it. Which chunks coalesce
    depends on timing, so the gRPC client and the front door would see different texts for
    the same tokens. An answer that ends on a whole character holds nothing back.
    """
    ids = client.generate(prompt, sampling=Sampling(max_tokens=n), **kwargs).token_ids
    for k in range(len(ids), 0, -1):
        if not builder.tokenizer.decode(ids[:k], skip_special_tokens=True).endswith("\ufffd"):
            return k
    pytest.skip(f"no prefix of {ids} ends on a whole character")


def test_models_and_health(frontend: FrontDoor, oai: "openai.OpenAI") -> None:
    import openai

    models = httpx.get(f"{frontend.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny-mm"]
    # One model by id, as OpenAI and vLLM answer it; another id is an OpenAI-shaped 404.
    assert httpx.get(f"{frontend.url}/v1/models/tiny-mm", timeout=10).json() == models["data"][0]
    assert oai.models.retrieve("tiny-mm").id == "tiny-mm"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.models.retrieve("gpt-4o")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    health = httpx.get(f"{frontend.url}/health", timeout=60)
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_text_only_equals_grpc_client(oai: "openai.OpenAI", client: ChatClient, builder: PromptBuilder, stream: bool) -> None:
    prompt = "Hello there, how are you? café"
    n = _whole_chars(client, builder, prompt, 24)
    expected = client.generate(prompt, sampling=Sampling(max_tokens=n))
    text, usage, finish = _ask(oai, [{"role": "user", "content": prompt}], stream, max_tokens=n, temperature=0)
    assert text == expected.text
    assert usage["prompt_tokens"] == expected.num_input_tokens
    assert usage["completion_tokens"] == expected.num_output_tokens
    assert usage["total_tokens"] == expected.num_input_tokens + expected.num_output_tokens
    assert finish == ("length" if expected.num_output_tokens == n else "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_image_and_audio_parts_equal_grpc_client(
    oai: "openai.OpenAI", client: ChatClient, builder: PromptBuilder, media: tuple[bytes, bytes], grpc_url: str, stream: bool
) -> None:
    image, audio = media
    prompt = "What is in the picture and the clip?"
    n = _whole_chars(client, builder, prompt, 20, image=image, audio=audio)
    expected = client.generate(prompt, image=image, audio=audio, sampling=Sampling(max_tokens=n))
    content = [_image_part(image), _audio_part(audio), {"type": "text", "text": prompt}]
    text, usage, _ = _ask(oai, [{"role": "user", "content": content}], stream, max_completion_tokens=n)
    assert text == expected.text
    # Media rows are counted in the prompt: the embeddings' rows plus the text tokens.
    rows = embed(grpc_url, image=image, audio=audio)
    media_rows = len(rows["image_embeddings"]) + len(rows["audio_embeddings"])
    assert usage["prompt_tokens"] == expected.num_input_tokens > media_rows
    assert usage["completion_tokens"] == expected.num_output_tokens


def test_multi_turn_is_rendered_once_with_the_template(
    oai: "openai.OpenAI", client: ChatClient, builder: PromptBuilder, media: tuple[bytes, bytes], grpc_url: str
) -> None:
    image, audio = media
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Look at this:"}, _image_part(image)]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [_audio_part(audio), {"type": "text", "text": "And this clip?"}]},
    ]
    conversation = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Look at this:"}, {"type": "image"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "And this clip?"}]},
    ]
    n = _whole_chars(client, builder, None, 16, messages=conversation, image=image, audio=audio)
    text, usage, _ = _ask(oai, messages, stream=True, max_tokens=n, temperature=0)
    expected = client.generate(None, messages=conversation, image=image, audio=audio, sampling=Sampling(max_tokens=n))
    assert text == expected.text
    # The prompt the preprocessing model built: every turn, the template once, the media rows in place.
    rows = embed(grpc_url, image=image, audio=audio)
    prompt = builder.build_conversation(conversation_json(conversation), rows["image_embeddings"], rows["audio_embeddings"])
    assert usage["prompt_tokens"] == expected.num_input_tokens == prompt.input_ids.size
    rendered = builder.tokenizer.decode([t for t in prompt.input_ids.tolist() if t < builder.vocab_size])
    assert rendered.count("<|user|>") == 2 and rendered.count("<|system|>") == 1 and rendered.endswith("<|assistant|>")


def test_stop_and_seed_and_unknown_fields(oai: "openai.OpenAI", client: ChatClient) -> None:
    free = client.generate("Stop words test", sampling=Sampling(max_tokens=30))
    words = [w for w in free.text.split(" ") if w.isprintable() and w.strip() and "\ufffd" not in w]
    if not words:
        pytest.skip(f"no usable stop word in {free.text!r}")
    stop = words[min(1, len(words) - 1)]
    assert stop in free.text
    expected = free.text[: free.text.find(stop)]  # OpenAI: the text ends just before the stop string
    kwargs = {
        "model": "anything", "messages": [{"role": "user", "content": "Stop words test"}], "max_tokens": 30,
        "stop": [stop, "\x00never"], "seed": 7, "extra_body": {"some_unknown_field": 1, "logit_bias_v2": {}},
    }
    out = oai.chat.completions.create(**kwargs)
    assert out.choices[0].message.content == expected
    assert out.choices[0].finish_reason == "stop"
    streamed = list(oai.chat.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_langchain_snippet_runs_unchanged(frontend: FrontDoor) -> None:
    from langchain_openai import ChatOpenAI

    chat_model = ChatOpenAI(
        model="autoglm-phone-9b",
        temperature=0.5,
        base_url=f"{frontend.url}/v1",
        api_key="EMPTY",
        extra_body={"enable_thinking": True, "return_reasoning": True},
        streaming=True,
    )
    content = chat_model.invoke("你是谁?").content
    assert isinstance(content, str) and content


def _post(frontend: FrontDoor, body: dict) -> httpx.Response:
    return httpx.post(f"{frontend.url}/v1/chat/completions", json=body, timeout=120)


def _bad_cases(media: tuple[bytes, bytes], spec: "ModelSpec") -> list[tuple[str, dict, str, str]]:
    image, audio = media
    png = encode_image(synthetic_image(96, 64, seed=5), "PNG")
    over = b"\xff\xd8" + b"\0" * spec.vision.max_bytes
    user = lambda *parts: {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}  # noqa: E731
    return [
        ("bad base64", user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}),
         "messages[0].content[0]", "messages[0].content[0]: image data is not valid base64"),
        ("wrong MIME", user({"type": "text", "text": "hi"}, _image_part(png, "application/pdf")),
         "messages[0].content[1]", "messages[0].content[1]: unsupported image type 'application/pdf'"),
        ("over-size item", user(_image_part(over)),
         "messages[0].content[0]", f"over the limit of {spec.vision.max_bytes} bytes per image"),
        ("too many items", user(_image_part(image), _audio_part(audio), _image_part(png)),
         "messages[0].content[2]", "messages[0].content[2]: too many images: at most 1 image per request"),
        ("too many clips", user(_audio_part(audio), _audio_part(audio)),
         "messages[0].content[1]", "messages[0].content[1]: too many audio clips: at most 1 audio clip per request"),
        ("image fails to decode", user({"type": "text", "text": "What is this?"}, _image_part(corrupt_png_data(png), "image/png")),
         "messages[0].content[1]", "messages[0].content[1]: input 'image': could not decode the PNG data"),
        ("not an image", user(_image_part(b"definitely not an image", "image/png")),
         "messages[0].content[0]", "messages[0].content[0]: input 'image': not a JPEG/PNG/WebP image"),
        ("n=2", {**user({"type": "text", "text": "hi"}), "n": 2}, "n", "n=2: this server returns one choice per request; only n=1"),
        ("negative max_tokens", {**user({"type": "text", "text": "hi"}), "max_tokens": -1}, "max_tokens",
         "max_tokens=-1: must be at least 1"),
        ("negative temperature", {**user({"type": "text", "text": "hi"}), "temperature": -1}, "temperature",
         "temperature=-1.0: must be within 0..2"),
        ("tool role", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role",
         "messages[0]: role 'tool' is not supported"),
        ("messages missing", {"model": "m"}, "messages", "messages: Field required"),
    ]


def test_bad_inputs_get_400_with_their_message(frontend: FrontDoor, media: tuple[bytes, bytes], spec: "ModelSpec") -> None:
    for name, body, param, message in _bad_cases(media, spec):
        body.setdefault("model", "tiny-mm")
        for stream in (False, True):
            resp = _post(frontend, {**body, "stream": stream})
            assert resp.status_code == 400, (name, stream, resp.text)
            error = resp.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"] == param, (name, error)
            assert message in error["message"], (name, error["message"])
    # Not JSON at all.
    resp = httpx.post(f"{frontend.url}/v1/chat/completions", content=b"{nope", timeout=30)
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


def test_urls_inside_are_refused_without_connecting(frontend: FrontDoor) -> None:
    listener = Listener()
    try:
        for url, message in [
            (f"http://127.0.0.1:{listener.port}/a.png", "host '127.0.0.1' is not on this server's URL allowlist"),
            (f"http://localhost:{listener.port}/a.png", "a loopback address; refused"),
            ("http://10.0.0.1/a.png", "host '10.0.0.1' is not on this server's URL allowlist"),
            ("http://169.254.169.254/latest/meta-data/", "host '169.254.169.254' is not on this server's URL allowlist"),
            ("file:///etc/passwd", "URL scheme 'file' is not allowed"),
        ]:
            body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
            resp = _post(frontend, body)
            assert resp.status_code == 400, resp.text
            error = resp.json()["error"]
            assert error["param"] == "messages[0].content[0]" and error["code"] == "url_refused"
            assert message in error["message"], error["message"]
        assert listener.accepted == 0
    finally:
        listener.close()


def test_allowlisted_loopback_fetch_works_and_stops_big_bodies(
    grpc_url: str, bundle_dir: Path, tmp_path: Path, client: ChatClient, builder: PromptBuilder,
    media: tuple[bytes, bytes], spec: "ModelSpec",
) -> None:
    image = media[0]
    n = _whole_chars(client, builder, "Fetched?", 12, image=image)
    origin = BodyServer(body=image, big_total=spec.vision.max_bytes * 8)
    door = FrontDoor(grpc_url, bundle_dir, tmp_path / "door", "--allow-url-fetch", "--url-allow-host", "127.0.0.1")
    try:
        part = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{origin.port}/ok.png"}}
        body = {"model": "m", "max_tokens": n, "messages": [{"role": "user", "content": [part, {"type": "text", "text": "Fetched?"}]}]}
        resp = _post(door, body)
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == client.generate("Fetched?", image=image, sampling=Sampling(max_tokens=n)).text
        for path, message in [("/big", "(stopped reading)"), ("/declared", f"body of {origin.big_total} bytes is over the limit")]:
            part["image_url"]["url"] = f"http://127.0.0.1:{origin.port}{path}"
            resp = _post(door, body)
            assert resp.status_code == 400 and message in resp.json()["error"]["message"], resp.text
        origin.close()
        assert origin.sent < origin.big_total // 2  # the read stopped early, not after the whole body
    finally:
        door.stop()
        origin.close()


def _wait(condition: Callable[[], bool], deadline_s: float = 30.0) -> bool:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


def _abandon_and_check_cancelled(frontend: FrontDoor, server: TritonServer, leave: Callable[[dict], None]) -> None:
    """``leave`` sends a 256-token ``ignore_eos`` request and goes away before the end; then check
    that the front door cancelled it and the engine stopped early and freed its slot."""
    engine = lambda name: metric_sum(scrape_metrics(server.metrics_url), name) or 0.0  # noqa: E731
    status = lambda code: frontend.metrics().get(  # noqa: E731
        f'mmtriton_openai_requests_total{{endpoint="/v1/chat/completions",status="{code}"}}', 0.0
    )
    cancelled_before = engine("mmtriton_engine_requests_cancelled_total")
    tokens_before = engine("mmtriton_engine_step_sequences_total")
    door_before = frontend.metrics().get("mmtriton_openai_streams_cancelled_total", 0.0)
    left_before, failed_before = status(499), status(500)
    leave({"model": "m", "messages": [{"role": "user", "content": "Tell me a very long story."}],
           "max_tokens": 256, "ignore_eos": True})
    assert _wait(lambda: engine("mmtriton_engine_requests_in_flight") == 0)
    assert _wait(lambda: frontend.metrics().get("mmtriton_openai_streams_cancelled_total", 0.0) == door_before + 1)
    # The engine counted the cancellation (its metrics refresh every 0.2 s) and stopped early:
    # with ignore_eos the request would otherwise have generated all of its 256 tokens.
    assert _wait(lambda: engine("mmtriton_engine_requests_cancelled_total") == cancelled_before + 1)
    assert engine("mmtriton_engine_step_sequences_total") - tokens_before < 256
    assert frontend.metrics()["mmtriton_openai_requests_in_flight"] == 0
    # The request is counted as the client's leaving (499), not as a failure.
    assert _wait(lambda: status(499) == left_before + 1)
    assert status(500) == failed_before


def test_closed_stream_cancels_its_triton_request(frontend: FrontDoor, server: TritonServer) -> None:
    def leave(body: dict) -> None:
        received = 0
        with httpx.stream("POST", f"{frontend.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    received += 1
                    if received >= 3:
                        break  # leaving the block closes the connection mid-answer

    _abandon_and_check_cancelled(frontend, server, leave)


def test_client_that_leaves_a_whole_answer_request_cancels_it_too(frontend: FrontDoor, server: TritonServer) -> None:
    """Not streamed: the front door notices the closed connection while it collects the answer."""

    def leave(body: dict) -> None:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up (and closes) before the answer is whole
            httpx.post(f"{frontend.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.05))

    _abandon_and_check_cancelled(frontend, server, leave)


def test_metrics_count_requests_errors_and_latencies(frontend: FrontDoor, oai: "openai.OpenAI") -> None:
    _ask(oai, [{"role": "user", "content": "metrics"}], stream=True, max_tokens=8)
    _post(frontend, {"messages": [], "n": 3})
    m = frontend.metrics()
    assert m['mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    assert m['mmtriton_openai_requests_total{endpoint="/v1/chat/completions",status="400"}'] >= 1
    assert m['mmtriton_openai_errors_total{code="invalid_value",status="400"}'] >= 1
    assert m["mmtriton_openai_time_to_first_token_seconds_count"] >= 1
    assert m["mmtriton_openai_inter_token_latency_seconds_count"] >= 1
    assert m["mmtriton_openai_completion_tokens_total"] >= 8
    assert m["mmtriton_openai_requests_in_flight"] == 0


def test_health_is_503_without_a_working_triton(bundle_dir: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nothing listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{sock.getsockname()[1]}"
        door = FrontDoor(dead, bundle_dir, tmp_path / "door")
        try:
            resp = httpx.get(f"{door.url}/health", timeout=60)
            assert resp.status_code == 503 and resp.json()["status"] == "unavailable"
            assert resp.json()["error"]["message"].startswith(f"not ready: Triton at {dead}: "), resp.text
            for stream in (False, True):
                body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": stream}
                chat = _post(door, body)
                assert chat.status_code == 503, chat.text
                error = chat.json()["error"]
                assert error["type"] == "service_unavailable" and error["code"] == "upstream_unavailable"
                assert error["message"].startswith(f"Triton at {dead} is unavailable: "), error["message"]
        finally:
            door.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_answers_the_open_stream_then_exits_0_without_a_traceback(
    grpc_url: str, bundle_dir: Path, tmp_path: Path, spec: "ModelSpec", sig: signal.Signals
) -> None:
    """Ctrl-C on ``make openai`` (SIGINT, by the process's pid here) and SIGTERM: uvicorn's graceful
    shutdown (the stream already open runs to its end), one log line, exit code 0."""
    door = FrontDoor(grpc_url, bundle_dir, tmp_path / "door")
    max_tokens = spec.llm.max_output_len
    body = {"model": "m", "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    events: list[dict] = []
    try:
        with httpx.stream("POST", f"{door.url}/v1/chat/completions", json=body, timeout=120) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    if events[-1]["choices"] and events[-1]["choices"][0]["delta"].get("content"):
                        break
            os.kill(door.process.pid, sig)  # mid-answer
            rest = [line for line in lines if line]
        code = door.process.wait(timeout=60)
    finally:
        door.stop()
    events += [json.loads(line[6:]) for line in rest if line.startswith("data: {")]
    log = door.log_path.read_text()
    assert rest and rest[-1] == "data: [DONE]", rest[-3:]
    assert events[-1]["usage"]["completion_tokens"] == max_tokens  # the whole answer, not one cut short
    assert code == 0, log
    assert "Traceback" not in log, log
    assert log.count(f"{sig.name}: stopping after the open requests are answered") == 1, log
    assert "Application shutdown complete" in log, log


def test_text_input_and_messages_together_are_refused(client: ChatClient) -> None:
    import uuid

    import numpy as np

    from clients.errors import InvalidInputError
    from mmtriton.contract import CHAT_MESSAGES

    values = request_values("hi", None, None, Sampling(max_tokens=2), True)
    values[CHAT_MESSAGES] = np.array([[conversation_json([{"role": "user", "content": "hi"}]).encode()]], dtype=np.object_)
    with pytest.raises(InvalidInputError, match="send either text_input .one user turn. or messages"):
        list(client._grpc("chat_text", values, uuid.uuid4().hex))


def _doc_blocks(kind: str) -> list[str]:
    text = (ROOT / "docs" / "openai.md").read_text()
    return [block.split("\n", 1)[1] for block in text.split("```")[1::2] if block.startswith(kind + "\n")]


def test_docs_examples_run(frontend: FrontDoor, tmp_path: Path) -> None:
    """docs/openai.md's python examples (the openai client with image and audio, LangChain) and its curl lines."""
    from mmtriton.media.samples import write_samples

    image, audio = write_samples(tmp_path)
    blocks = _doc_blocks("python")
    assert len(blocks) == 2
    for code in blocks:
        code = code.replace("http://localhost:9000/v1", f"{frontend.url}/v1")
        code = code.replace("build/samples/sample.jpg", str(image)).replace("build/samples/sample.wav", str(audio))
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip()
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    curls = [c for c in _doc_blocks("bash") if "curl" in c]
    assert curls
    script = curls[0].replace("localhost:9000", frontend.url.removeprefix("http://"))
    script = script.replace("build/samples/sample.jpg", str(image))
    run = subprocess.run(["bash", "-ec", script], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr
    assert '"object":"chat.completion"' in run.stdout and "data: [DONE]" in run.stdout


def test_channel_refresh_opens_a_new_channel_and_closes_the_old_after_its_streams() -> None:
    """A fresh channel (a fresh DNS answer: new worker pods) without cutting open streams."""
    import asyncio

    from openai_frontend.triton import TritonChat

    async def run() -> None:
        chat = TritonChat("127.0.0.1:1", refresh_s=0.2)  # nothing needs to listen: no RPC is made
        first = chat._take()  # a stream opens on the first channel
        assert chat._take() is first and chat.channels == 1  # young channel: reused
        await chat._give_back(first)
        await asyncio.sleep(0.3)
        second = chat._take()  # old enough: new requests get a new channel
        assert second is not first and chat.channels == 2  # the first still has a stream open
        assert first.channel.get_state() is not None  # and is not closed yet
        await chat._give_back(first)  # its last stream ends: it closes
        assert chat.channels == 1
        await chat._give_back(second)
        await chat.close()

    asyncio.run(asyncio.wait_for(run(), 30))


def test_metrics_port_of_their_own_leaves_the_api_port_without_them(grpc_url: str, bundle_dir: Path, tmp_path: Path) -> None:
    from mmtriton.serving.server import reserve_ports

    reservation = reserve_ports(1)
    port = reservation.ports[0]
    reservation.release()  # the front door binds it now
    door = FrontDoor(grpc_url, bundle_dir, tmp_path / "door", "--metrics-port", str(port))
    try:
        assert httpx.get(f"{door.url}/metrics", timeout=10).status_code == 404
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "mmtriton_openai_requests_in_flight" in text
    finally:
        door.stop()
