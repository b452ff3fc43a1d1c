"""The client against a real ``duplex demo`` (mock voice: 25 frames of 1920 bytes per text chunk).

Bounds are generous on purpose: the tests assert behaviour (which frames, which
events, in which order), not speed, and must pass on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import silence, tone
from websockets.asyncio.server import ServerConnection, serve

from duplex_client import (
    FRAME_BYTES,
    AudioFrame,
    Client,
    ConnectionClosed,
    DuplexError,
    ErrorEvent,
    Event,
    Interrupted,
    SessionEnd,
    Vad,
    read_wav,
    write_wav,
)

MOCK_FRAMES = 25  # per text chunk
WAIT = 60.0  # seconds: an upper bound for anything that should take well under one


def assert_full_utterance(frames: list[AudioFrame], chunks: int = 1) -> None:
    n = MOCK_FRAMES * chunks
    assert [f.sequence for f in frames] == list(range(1, n + 1))
    assert all(len(f.pcm) == FRAME_BYTES and not f.is_final for f in frames)


async def wait_until(cond, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("fmt", ["json", "binary"])
async def test_speak_yields_25_frames(demo_url: str, fmt: str) -> None:
    async with Client(demo_url, format=fmt) as c:  # type: ignore[arg-type]
        assert c.session is not None and c.session.session_id.startswith("ws-")
        assert c.session.format == fmt
        frames = []
        u = c.speak("Hello world")
        async for frame in u:
            frames.append(frame)
        assert_full_utterance(frames)
        assert u.end_sequence == MOCK_FRAMES + 1
        assert u.interrupted is None and u.error is None and u.done
        assert u.played_ms == MOCK_FRAMES * 20


async def test_asap_pacing(demo_url: str) -> None:
    async with Client(demo_url, pacing="asap") as c:
        assert c.session is not None and c.session.pacing == "asap"
        assert_full_utterance(await c.speak("fast").collect())


async def test_utterances_play_in_order(demo_url: str) -> None:
    async with Client(demo_url) as c:
        u1, u2, u3 = c.speak("one"), c.speak("two"), c.speak("three")
        assert u1.sent and not u2.sent and not u3.sent  # one in flight, the rest held locally
        f2 = await u2.collect()  # iterating out of order is fine: frames are buffered per utterance
        assert u1.done
        f1 = await u1.collect()
        f3 = await u3.collect()
        for frames in (f1, f2, f3):
            assert_full_utterance(frames)


async def test_streamed_chunks_form_one_utterance(demo_url: str) -> None:
    async with Client(demo_url) as c:
        u = await c.say_chunk("Hello ")
        assert c.open_utterance is u
        assert await c.say_chunk("world, how ") is u
        assert await c.say_chunk("are you?", final=True) is u
        assert c.open_utterance is None
        frames = await asyncio.wait_for(u.collect(), WAIT)
        assert_full_utterance(frames, chunks=3)
        assert u.text == "Hello world, how are you?"
        # A speak() queued behind an open streamed utterance waits for it.
        s = await c.say_chunk("first ")
        later = c.speak("second")
        assert not later.sent
        await c.say_chunk("part", final=True)
        assert_full_utterance(await s.collect(), chunks=2)
        assert_full_utterance(await later.collect())


async def test_pause_stops_frames_and_resume_continues_without_loss(demo_url: str) -> None:
    async with Client(demo_url) as c:
        u = c.speak("pause me")
        await wait_until(lambda: u.frames_received >= 5)
        await c.pause()
        await asyncio.sleep(0.5)  # frames already on the wire may still land
        paused_at = u.frames_received
        await asyncio.sleep(1.0)  # two full utterances' worth of time
        assert u.frames_received == paused_at, "frames kept coming while paused"
        assert paused_at < MOCK_FRAMES
        assert not u.done
        await c.resume()
        frames = await asyncio.wait_for(u.collect(), WAIT)
        assert_full_utterance(frames)  # 1..25: nothing lost, nothing repeated
        assert u.interrupted is None


async def test_stop_from_another_task_interrupts_iteration(demo_url: str) -> None:
    async with Client(demo_url) as c:
        events = c.events()
        u = c.speak("stop me")
        queued = c.speak("never spoken")
        got: list[AudioFrame] = []

        async def consume() -> None:
            async for frame in u:
                got.append(frame)

        consumer = asyncio.create_task(consume())
        await wait_until(lambda: len(got) >= 5)
        await c.stop()
        assert queued.done and queued.cancelled  # dropped at once, never sent
        assert await queued.collect() == []
        await asyncio.wait_for(consumer, WAIT)  # iteration ends at the end marker

        assert u.interrupted is not None and u.interrupted.reason == "stop"
        assert 5 <= len(got) < MOCK_FRAMES
        assert u.interrupted.sequence == len(got) == u.frames_received
        assert u.interrupted.played_ms == 20 * len(got) == u.played_ms
        assert u.end_sequence == len(got) + 1
        ev = await events.wait_for(Interrupted, timeout=WAIT)
        assert ev == u.interrupted
        # The session carries on.
        assert_full_utterance(await asyncio.wait_for(c.speak("after stop").collect(), WAIT))


async def test_stop_while_streaming_chunks(demo_url: str) -> None:
    async with Client(demo_url) as c:
        u = await c.say_chunk("streaming ")
        await wait_until(lambda: u.frames_received >= 3)
        await c.stop()
        assert c.open_utterance is None
        frames = await asyncio.wait_for(u.collect(), WAIT)
        assert u.interrupted is not None and len(frames) < MOCK_FRAMES
        # The next chunk starts a new utterance.
        v = await c.say_chunk("fresh", final=True)
        assert v is not u
        assert_full_utterance(await asyncio.wait_for(v.collect(), WAIT))


async def test_stop_when_idle_is_harmless(demo_url: str) -> None:
    async with Client(demo_url) as c:
        await c.stop()
        await c.pause()
        await c.resume()
        assert_full_utterance(await asyncio.wait_for(c.speak("still fine").collect(), WAIT))


async def test_microphone_speech_is_detected_and_barges_in(demo_url: str) -> None:
    async with Client(demo_url, input_rate=16_000) as c:
        events = c.events()
        u = c.speak("talk over me")
        queued = c.speak("dropped by the barge-in")
        await wait_until(lambda: u.frames_received >= 3)
        for _ in range(15):  # 300 ms of loud tone in 20 ms chunks, as a microphone would
            await c.send_audio(tone(20))
        vad = await events.wait_for(Vad, timeout=WAIT)
        assert vad.speaking is True
        frames = await asyncio.wait_for(u.collect(), WAIT)
        assert u.interrupted is not None and u.interrupted.reason == "barge_in"
        assert len(frames) < MOCK_FRAMES
        assert u.interrupted.played_ms == 20 * len(frames)
        assert queued.cancelled  # the server drops its queue on barge-in; so does the client
        await c.send_audio(silence(800))  # speech ends after 400 ms below the threshold
        assert (await events.wait_for(Vad, timeout=WAIT)).speaking is False
        assert_full_utterance(await asyncio.wait_for(c.speak("go on").collect(), WAIT))


async def test_silence_is_not_speech(demo_url: str) -> None:
    async with Client(demo_url) as c:
        events = c.events()
        u = c.speak("quiet audience")
        await c.send_audio(silence(300))
        frames = await asyncio.wait_for(u.collect(), WAIT)
        assert_full_utterance(frames)
        events.close()
        assert [e async for e in events if isinstance(e, Vad)] == []


async def test_invalid_input_gives_error_events_and_session_survives(demo_url: str) -> None:
    async with Client(demo_url) as c:
        events = c.events()
        await c.send_json("this is not json")
        err = await events.wait_for(ErrorEvent, timeout=WAIT)
        assert err.code == "INVALID_MESSAGE" and "JSON" in err.message
        await c.send_json({"type": "control", "command": "JUMP"})
        err = await events.wait_for(ErrorEvent, timeout=WAIT)
        assert err.code == "INVALID_MESSAGE" and "JUMP" in err.message
        await c.send_json({"type": "bogus"})
        err = await events.wait_for(ErrorEvent, timeout=WAIT)
        assert err.code == "INVALID_MESSAGE"
        with pytest.raises(ValueError):
            c.speak("")
        with pytest.raises(ValueError):
            await c.send_audio(b"\x00")  # half a sample
        assert_full_utterance(await asyncio.wait_for(c.speak("still here").collect(), WAIT))


async def test_events_with_audio_and_callback(demo_url: str) -> None:
    seen: list[Event] = []

    async def on_event(event: Event) -> None:
        seen.append(event)

    async with Client(demo_url, format="json", on_event=on_event) as c:
        stream = c.events(include_audio=True)
        await c.speak("events").wait()
        stream.close()
        audio = [e async for e in stream if isinstance(e, AudioFrame)]
    assert [f.sequence for f in audio] == list(range(1, MOCK_FRAMES + 2))
    assert audio[-1].is_final and audio[-1].pcm == b""
    assert [e for e in seen if isinstance(e, AudioFrame)] == audio


async def test_wav_helper_round_trip(demo_url: str, tmp_path: Path) -> None:
    async with Client(demo_url) as c:
        frames = await c.speak("save me").collect()
    path = tmp_path / "out.wav"
    assert write_wav(path, frames) == MOCK_FRAMES * FRAME_BYTES
    pcm, rate = read_wav(path)
    assert rate == 48_000
    assert pcm == b"".join(f.pcm for f in frames)
    assert any(pcm)  # a tone, not silence


def test_wav_helper_raw_bytes_and_bad_layout(tmp_path: Path) -> None:
    import wave

    path = tmp_path / "raw.wav"
    chunks = [bytes([i]) * 64 for i in range(4)]
    write_wav(path, chunks, sample_rate=16_000)
    assert read_wav(path) == (b"".join(chunks), 16_000)
    stereo = tmp_path / "stereo.wav"
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(b"\x00" * 16)
    with pytest.raises(ValueError):
        read_wav(stereo)


# ----- against a scripted server: auth, failures, closing ------------------------------------


class FakeServer:
    """A tiny WebSocket server that records the handshake and runs a script per connection."""

    def __init__(self, script) -> None:  # type: ignore[no-untyped-def]
        self.script = script
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.received: list[str | bytes] = []

    async def handler(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.paths.append(ws.request.path)
        self.auth.append(ws.request.headers.get("Authorization"))
        await ws.send(json.dumps({"type": "session_start", "session_id": "ws-000000000000"}))
        await self.script(self, ws)

    async def __aenter__(self) -> str:
        self._server = await serve(self.handler, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/"

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()


async def idle(server: FakeServer, ws: ServerConnection) -> None:
    async for message in ws:
        server.received.append(message)


async def test_token_goes_in_header_by_default_or_in_query() -> None:
    fake = FakeServer(idle)
    async with fake as url:
        async with Client(url, token="s3cret", model="espeak-de"):
            pass
        async with Client(url + "?x=1", token="s3cret", token_in_query=True, format="json"):
            pass
        async with Client(url):
            pass
    assert fake.auth == ["Bearer s3cret", None, None]
    q0, q1, q2 = (parse_qs(urlsplit(p).query) for p in fake.paths)
    assert q0 == {"format": ["binary"], "pacing": ["realtime"], "model": ["espeak-de"]}
    assert q1 == {"x": ["1"], "format": ["json"], "pacing": ["realtime"], "token": ["s3cret"]}
    assert "token" not in q2


async def test_error_instead_of_session_start_raises() -> None:
    async def reject(ws: ServerConnection) -> None:
        await ws.send(json.dumps({"type": "error", "code": "UNAUTHORIZED", "message": "bad token"}))
        await ws.close()

    server = await serve(reject, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(DuplexError) as info:
            async with Client(f"ws://127.0.0.1:{port}/", token="wrong"):
                pass
        assert info.value.code == "UNAUTHORIZED"
    finally:
        server.close()
        await server.wait_closed()


async def test_synthesis_failure_raises_with_code() -> None:
    async def fail(server: FakeServer, ws: ServerConnection) -> None:
        async for message in ws:
            server.received.append(message)
            if isinstance(message, str) and json.loads(message)["type"] == "text":
                header = bytes([1, 0, 0, 0]) + (1).to_bytes(4, "little")
                await ws.send(header + b"\x01\x00" * 960)
                await ws.send(
                    json.dumps({"type": "error", "code": "SYNTHESIS_FAILED", "message": "worker died"})
                )
                await ws.send(bytes([1, 1, 0, 0]) + (2).to_bytes(4, "little"))

    async with FakeServer(fail) as url, Client(url) as c:
        u = c.speak("doomed")
        frames = []
        with pytest.raises(DuplexError) as info:
            async for frame in u:
                frames.append(frame)
        assert info.value.code == "SYNTHESIS_FAILED"
        assert [f.sequence for f in frames] == [1]  # frames before the failure still arrive
        assert u.error is info.value and u.end_sequence == 2


async def test_server_closing_ends_waiters_with_connection_closed() -> None:
    async def end_session(server: FakeServer, ws: ServerConnection) -> None:
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "text":
                await ws.send(json.dumps({"type": "session_end", "reason": "shutdown"}))
                await ws.close()

    async with FakeServer(end_session) as url, Client(url) as c:
        events = c.events()
        u = c.speak("interrupted by shutdown")
        queued = c.speak("never")
        with pytest.raises(ConnectionClosed) as info:
            await asyncio.wait_for(u.collect(), WAIT)
        assert info.value.reason == "shutdown"
        with pytest.raises(ConnectionClosed):
            await queued.wait()
        assert c.session_end == SessionEnd(reason="shutdown")
        assert [e async for e in events] == [SessionEnd(reason="shutdown")]
        with pytest.raises(ConnectionClosed):
            c.speak("too late")
        await c.wait_closed()


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Client("http://example.invalid/")
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/", format="xml")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/", pacing="slow")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Client("ws://127.0.0.1:1/", input_rate=44_100)


async def test_cancel_one_utterance_keeps_the_others(demo_url: str) -> None:
    async with Client(demo_url) as c:
        playing, doomed, kept = c.speak("one"), c.speak("two"), c.speak("three")
        await doomed.cancel()  # queued: just unqueued
        assert doomed.cancelled and doomed.done and not doomed.sent
        await wait_until(lambda: playing.frames_received >= 3)
        await playing.cancel()  # in flight: STOP, which touches nothing else
        frames = await asyncio.wait_for(playing.collect(), WAIT)
        assert playing.interrupted is not None and len(frames) < MOCK_FRAMES
        assert_full_utterance(await asyncio.wait_for(kept.collect(), WAIT))
        await kept.cancel()  # done: no-op
        assert kept.interrupted is None
