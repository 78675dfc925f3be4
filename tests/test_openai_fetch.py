"""The front door's URL fetcher and content-part parsing, in-process (loopback listeners only).

Refused URLs are shown to make no connection at all: a loopback listener records
every connection it accepts, and host names are pointed at chosen addresses by
replacing ``socket.getaddrinfo`` (no DNS server is involved). Origins that drip
their answer a byte at a time show the fetch deadline is a hard one.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from mmtriton.spec import ModelSpec
from openai_frontend.errors import APIError
from openai_frontend.fetch import FetchBusy, FetchError, FetchPolicy, FetchPool, fetch_url
from openai_frontend.media import MediaLimits, parse_messages
from tests.helpers.frontdoor import DEADLINE_MARGIN_S, BodyServer, DripServer, Listener


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    yield lst
    lst.close()


@pytest.fixture
def drip() -> Iterator[DripServer]:
    srv = DripServer()
    yield srv
    srv.close()


@pytest.fixture
def body_server() -> Iterator[BodyServer]:
    srv = BodyServer()
    yield srv
    srv.close()


def _resolve_to(monkeypatch: pytest.MonkeyPatch, names: dict[str, str]) -> None:
    """Point host names at addresses for this test, as a DNS server could."""
    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: object, **kwargs: object) -> list:
        if host in names:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (names[host], port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)


def test_fetching_is_off_by_default(listener: Listener) -> None:
    with pytest.raises(FetchError, match="fetching URLs is disabled"):
        fetch_url(f"http://127.0.0.1:{listener.port}/a.png", 1000, FetchPolicy())
    assert listener.accepted == 0


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("10.0.0.1", "a private address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("192.168.1.20", "a private address"),
        ("0.0.0.0", "an unspecified address"),
    ],
)
def test_allowlisted_names_that_resolve_inside_are_refused_before_connecting(
    monkeypatch: pytest.MonkeyPatch, listener: Listener, address: str, reason: str
) -> None:
    _resolve_to(monkeypatch, {"media.example": address})
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"media.example"}))
    with pytest.raises(FetchError, match=f"resolves to {address}, {reason}; refused"):
        fetch_url(f"http://media.example:{listener.port}/a.png", 1000, policy)
    assert listener.accepted == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:{port}/a.png", "host '127.0.0.1' is not on this server's URL allowlist"),
        ("http://10.0.0.1:{port}/a.png", "host '10.0.0.1' is not on this server's URL allowlist"),
        ("http://169.254.169.254/latest/meta-data/", "host '169.254.169.254' is not on this server's URL allowlist"),
        ("file:///etc/passwd", "URL scheme 'file' is not allowed"),
        ("ftp://127.0.0.1:{port}/a.png", "URL scheme 'ftp' is not allowed"),
        ("http://localhost:{port}/a.png", "resolves to"),  # allowlisted by name, loopback by address
    ],
)
def test_refused_urls_make_no_connection(listener: Listener, url: str, message: str) -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"localhost"}))
    with pytest.raises(FetchError, match=message):
        fetch_url(url.format(port=listener.port), 1000, policy)
    assert listener.accepted == 0


def test_metadata_address_stays_refused_even_when_listed() -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"169.254.169.254"}))
    with pytest.raises(FetchError, match="a cloud metadata address"):
        fetch_url("http://169.254.169.254/latest/meta-data/", 1000, policy)


def test_explicit_loopback_literal_fetches(body_server: BodyServer) -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1"}))
    got = fetch_url(f"http://127.0.0.1:{body_server.port}/ok.png", 1000, policy)
    assert got.data == b"\x89PNG fake" and got.content_type == "image/png"


@pytest.mark.parametrize("path", ["/big", "/declared"])
def test_byte_limit_stops_the_body_early(body_server: BodyServer, path: str) -> None:
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1"}))
    with pytest.raises(FetchError, match="over the limit of 100000 bytes"):
        fetch_url(f"http://127.0.0.1:{body_server.port}{path}", 100_000, policy)
    body_server.close()  # waits for the handler: every byte it could push is counted
    # Only what the socket buffers took before the hang-up was sent, far from the 64 MiB body.
    assert body_server.sent < body_server.big_total // 4


def test_each_redirect_is_checked_again(monkeypatch: pytest.MonkeyPatch, body_server: BodyServer, listener: Listener) -> None:
    _resolve_to(monkeypatch, {"inside.example": "10.0.0.1"})
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1", "inside.example"}))
    base = f"http://127.0.0.1:{body_server.port}"
    # To an allowed place: followed.
    assert fetch_url(f"{base}/redirect?to=/ok.png", 1000, policy).data == b"\x89PNG fake"
    # To the metadata address, a name that resolves inside, another scheme: refused at that hop.
    for target, message in [
        ("http://169.254.169.254/latest/meta-data/", "not on this server's URL allowlist"),
        (f"http://inside.example:{listener.port}/x", "resolves to 10.0.0.1, a private address"),
        ("file:///etc/passwd", "URL scheme 'file'"),
    ]:
        with pytest.raises(FetchError, match=message):
            fetch_url(f"{base}/redirect?to={target}", 1000, policy)
    assert listener.accepted == 0
    # A redirect loop ends after max_redirects.
    loop = f"{base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/redirect?to={base}/ok.png"
    with pytest.raises(FetchError, match="more than 2 redirects"):
        fetch_url(loop, 1000, FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1"}), max_redirects=2))


@pytest.mark.parametrize(("path", "doing"), [("/head", "reading the response headers"), ("/body", "reading the body")])
def test_a_slow_drip_is_cut_at_the_deadline(drip: DripServer, path: str, doing: str) -> None:
    """Every recv gets a byte well within the socket timeout; only the hard deadline ends the fetch."""
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1"}), timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match=rf"fetching took longer than 1.5 s \(while {doing}\)"):
        fetch_url(drip.url(path), 1000, policy)
    assert time.monotonic() - started < 1.5 + DEADLINE_MARGIN_S
    full = len(DripServer.HEAD + DripServer.BODY) if path == "/head" else len(DripServer.BODY)
    assert 0 < drip.sent[path] < full  # it was cut mid-drip, not after the whole answer


def test_fetch_pool_bounds_fetches_and_keeps_off_the_default_executor(drip: DripServer) -> None:
    """Fetches run on the pool's own threads: with the loop's default executor down to 2 threads,
    4 dripping fetches still leave it free (``/health``'s probe runs there). Over the pool's
    limit, a fetch that gets no slot before its deadline is refused as busy."""
    policy = FetchPolicy(enabled=True, allowed_hosts=frozenset({"127.0.0.1"}), timeout_s=2.0, max_concurrent=4)

    async def run() -> tuple[list[object], float, float]:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=2))
        pool = FetchPool(policy)
        started = time.monotonic()
        tasks = [asyncio.ensure_future(pool.fetch(drip.url("/body"), 1000)) for _ in range(5)]
        await asyncio.sleep(0.3)
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.01) for _ in range(4)))
        free_after = time.monotonic() - started
        results = await asyncio.gather(*tasks, return_exceptions=True)
        pool.close()
        return results, free_after, time.monotonic() - started

    results, free_after, total = asyncio.run(asyncio.wait_for(run(), 60))
    busy = [r for r in results if isinstance(r, FetchBusy)]
    late = [r for r in results if isinstance(r, FetchError) and not isinstance(r, FetchBusy)]
    assert len(busy) == 1 and "4 URL fetches were already running" in str(busy[0])
    assert len(late) == 4 and all("took longer than 2 s" in str(r) for r in late)
    assert free_after < 2.0  # the default executor answered while every fetch was still dripping
    assert total < 2.0 + DEADLINE_MARGIN_S
    assert drip.connections == 4  # the busy one never connected


def _no_fetch(url: str, max_bytes: int, param: str) -> object:
    raise AssertionError("no URL should be fetched")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!not base64!!!"}}],
         "messages[0].content[0]: image data is not valid base64"),
        ([{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}}],
         "messages[0].content[1]: unsupported image type 'text/plain'; supported: image/jpeg, image/png, image/webp"),
        ([{"type": "input_audio", "input_audio": {"data": "aGVsbG8=", "format": "mp3"}}],
         "messages[0].content[0]: unsupported audio format 'mp3'; supported: wav, flac, ogg"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"x" * 2001).decode()}}],
         "messages[0].content[0]: image is 2001 bytes, over the limit of 2000 bytes per image"),
        ([{"type": "input_audio", "input_audio": {"data": base64.b64encode(b"x" * 9000).decode(), "format": "wav"}}],
         "messages[0].content[0]: audio is about 9000 bytes, over the limit of 3000 bytes per audio"),
        ([{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}] * 2,
         "messages[0].content[1]: too many images: at most 1 image per request"),
        ([{"type": "file", "file": {}}],
         "messages[0].content[0]: content part type 'file' is not supported"),
    ],
)
def test_bad_parts_name_message_part_and_limit(content: list, message: str) -> None:
    limits = MediaLimits(image_max_bytes=2000, audio_max_bytes=3000)
    with pytest.raises(APIError) as err:
        asyncio.run(parse_messages([{"role": "user", "content": content}], limits, _no_fetch))
    assert err.value.status == 400
    assert err.value.message.startswith(message), err.value.message
    assert err.value.param and err.value.param.startswith("messages[0].content[")


def test_parts_become_placeholders_in_place(spec: ModelSpec) -> None:
    png = base64.b64encode(b"\x89PNG...").decode()
    wav = base64.b64encode(b"RIFF....WAVE").decode()
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
        {"role": "assistant", "content": None},
        {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": wav, "format": "WAV"}}, {"type": "text", "text": "and this?"}]},
    ]
    parsed = asyncio.run(parse_messages(messages, MediaLimits.from_spec(spec), _no_fetch))
    assert parsed.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "and this?"}]},
    ]
    assert parsed.image == b"\x89PNG..." and parsed.audio == b"RIFF....WAVE"
    assert (parsed.image_param, parsed.audio_param) == ("messages[1].content[1]", "messages[3].content[0]")


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_stop_text_ends_before_the_first_stop_string_in_any_split(size: int) -> None:
    from openai_frontend.answer import StopText

    answer = "alpha beta STOP gamma END delta"
    for stops, expected in (((" END", "STOP"), "alpha beta "), (("zzz",), answer), ((), answer), (("a",), "")):
        trimmer = StopText(stops)
        pieces = [trimmer.push(answer[i : i + size]) for i in range(0, len(answer), size)]
        out = "".join(pieces) + trimmer.flush()
        assert out == expected, (stops, size, pieces)
        assert trimmer.hit == (expected != answer)
        # Nothing sent is ever taken back: every piece is a prefix extension of the expected text.
        assert expected.startswith("".join(pieces))


def test_work_is_cancelled_when_the_client_leaves_and_kept_while_it_stays() -> None:
    from openai_frontend.answer import unless_client_leaves

    class Client:
        def __init__(self, leaves_after: int | None) -> None:
            self.polls, self.leaves_after = 0, leaves_after

        async def is_disconnected(self) -> bool:
            self.polls += 1
            return self.leaves_after is not None and self.polls >= self.leaves_after

    async def run() -> None:
        cancelled = asyncio.Event()

        async def forever() -> None:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        client = Client(leaves_after=3)
        assert await unless_client_leaves(forever(), client, poll_s=0.01) is False
        assert cancelled.is_set() and client.polls == 3

        async def quick() -> str:
            await asyncio.sleep(0.05)
            return "done"

        staying = Client(leaves_after=None)
        assert await unless_client_leaves(quick(), staying, poll_s=0.01) is True and staying.polls >= 1

        async def broken() -> None:
            raise ValueError("engine said no")

        with pytest.raises(ValueError, match="engine said no"):
            await unless_client_leaves(broken(), Client(None), poll_s=0.01)

    asyncio.run(asyncio.wait_for(run(), 30))
