"""asyncio client for the duplex voice gateway.

Design, and why:

* **One reader task** owns the socket's receive side and dispatches every
  message: audio to the utterance it belongs to, everything else to event
  subscribers. Iterating an utterance therefore never reads the socket itself,
  so ``pause()``/``stop()``/``send_audio()`` from other tasks work while a
  ``speak()`` iterator is running.
* **One sender task** writes messages in the order they were queued. Queuing is
  synchronous, so client state (which utterance is playing, which are waiting)
  changes atomically with the decision to send, and ``speak()`` needs no
  ``await``.
* **At most one utterance in flight.** The server drops its queued utterances
  silently on STOP or barge-in (only the playing one gets ``interrupted`` and an
  end marker), so if several were queued server-side the client could not tell
  which later frames belong to which. The client keeps its queue locally and
  sends the next utterance's text when the previous end marker arrives. The
  cost is one round trip between consecutive utterances; the server itself only
  starts synthesising the next utterance when the current one ends, so nothing
  else is lost.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import logging
import struct
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed as WsConnectionClosed

from .errors import ConnectionClosed, DuplexError, ProtocolError
from .events import (
    FRAME_MS,
    SAMPLE_RATE,
    AudioFrame,
    ErrorEvent,
    Event,
    Interrupted,
    SessionEnd,
    SessionStart,
    UnknownEvent,
    Vad,
)

__all__ = ["Client", "Utterance", "EventStream"]

log = logging.getLogger("duplex_client")

Format = Literal["json", "binary"]
Pacing = Literal["realtime", "asap"]
EventCallback = Callable[[Event], "Awaitable[None] | None"]
E = TypeVar("E")

#: Binary audio header: version u8, flags u8 (bit 0 = final), reserved u16, sequence u32 LE.
_HEADER = struct.Struct("<BBHI")
_BINARY_VERSION = 1
_FLAG_FINAL = 1

#: Error codes that concern the utterance being synthesised (they are followed
#: by its end marker); other codes concern a single client message.
_UTTERANCE_ERRORS = frozenset(
    {"WORKER_UNAVAILABLE", "SYNTHESIS_FAILED", "RATE_LIMITED", "INTERNAL_ERROR"}
)

_END = object()  # end-of-utterance sentinel in an utterance's frame queue


class Utterance:
    """One utterance: the text sent for it and the audio frames that come back.

    Iterate it (``async for frame in utterance``) to receive its ``AudioFrame``s
    in order; iteration ends at the server's end marker, also when the utterance
    was stopped (then ``interrupted`` says how much was played) and raises
    ``DuplexError`` if synthesis failed. An utterance cancelled by ``stop()``
    before it was sent ends without frames (``cancelled`` is true).

    Only one task should iterate a given utterance.
    """

    def __init__(self, client: Client) -> None:
        self._client = client
        self._chunks: list[tuple[str, bool]] = []  # (text, is_final) not sent yet
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._done = asyncio.get_running_loop().create_future()
        self.text = ""
        """All text given for this utterance so far."""
        self.final = False
        """Whether the text is complete (the last chunk had ``final=True``)."""
        self.sent = False
        """Whether its text went to the server (it has been the utterance in flight)."""
        self.cancelled = False
        """Dropped by ``stop()`` (or a barge-in) before it was sent."""
        self.frames_received = 0
        """Audio frames received so far (counted by the reader, not the consumer)."""
        self.interrupted: Interrupted | None = None
        """Set when the server reported the utterance interrupted (STOP or barge-in)."""
        self.error: DuplexError | None = None
        """Set when the utterance failed (e.g. ``SYNTHESIS_FAILED``) or the connection closed."""
        self.end_sequence: int | None = None
        """Sequence number of the end marker (frames sent + 1)."""

    # ----- state -------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        """True once the utterance ended (end marker, cancellation or connection loss)."""
        return self._done.done()

    @property
    def played_ms(self) -> int:
        """Audio the server sent for this utterance, in ms (what the listener could have heard)."""
        if self.interrupted is not None:
            return self.interrupted.played_ms
        return self.frames_received * FRAME_MS

    def _add_chunk(self, text: str, final: bool) -> None:
        self.text += text
        self.final = final
        self._chunks.append((text, final))

    def _take_chunks(self) -> list[tuple[str, bool]]:
        chunks, self._chunks = self._chunks, []
        return chunks

    def _frame(self, frame: AudioFrame) -> None:
        self.frames_received += 1
        self._queue.put_nowait(frame)

    def _finish(self, error: DuplexError | None = None) -> None:
        if self._done.done():
            return
        if error is not None and self.error is None:
            self.error = error
        self._queue.put_nowait(_END)
        self._done.set_result(None)

    # ----- consuming ---------------------------------------------------------------------

    def __aiter__(self) -> Utterance:
        return self

    async def __anext__(self) -> AudioFrame:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # later calls end too
            if self.error is not None:
                raise self.error
            raise StopAsyncIteration
        assert isinstance(item, AudioFrame)
        return item

    async def cancel(self) -> None:
        """Drop this utterance only: unqueue it, or STOP it if it is the one in flight.

        Unlike ``Client.stop()`` the utterances queued behind it are kept (the
        server never holds more than the one in flight, so its STOP touches
        nothing else). No-op once the utterance is done.
        """
        await self._client._cancel(self)

    async def wait(self) -> None:
        """Wait until the utterance ended; raises its error if it failed."""
        await asyncio.shield(self._done)
        if self.error is not None:
            raise self.error

    async def collect(self) -> list[AudioFrame]:
        """Iterate to the end and return all frames (raises like iteration does)."""
        return [frame async for frame in self]

    def __repr__(self) -> str:
        state = (
            "cancelled" if self.cancelled else "done" if self.done else "sent" if self.sent else "queued"
        )
        return f"<Utterance {state} frames={self.frames_received} text={self.text[:30]!r}>"


class EventStream:
    """A subscription to the client's events, created by ``Client.events()``.

    The subscription starts when it is created (not at the first ``await``), so
    events that arrive between creating it and iterating it are not lost. It ends
    when the connection closes, or on ``close()``.
    """

    def __init__(self, client: Client, include_audio: bool) -> None:
        self._client = client
        self.include_audio = include_audio
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._closed = False

    def _put(self, event: Event | object) -> None:
        if not self._closed:
            self._queue.put_nowait(event)

    def close(self) -> None:
        """Stop receiving events; iteration ends after what is already queued."""
        if not self._closed:
            self._queue.put_nowait(_END)
            self._closed = True
            self._client._subscribers.discard(self)

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)
            raise StopAsyncIteration
        return item  # type: ignore[return-value]

    async def wait_for(
        self,
        kind: type[E],
        predicate: Callable[[E], bool] | None = None,
        timeout: float | None = None,
    ) -> E:
        """Return the next event of type ``kind`` (matching ``predicate``), skipping others.

        Raises ``TimeoutError`` after ``timeout`` seconds and ``ConnectionClosed`` if the
        stream ends first.
        """

        async def find() -> E:
            async for event in self:
                if isinstance(event, kind) and (predicate is None or predicate(event)):
                    return event
            raise ConnectionClosed(f"event stream ended before a {kind.__name__} event")

        return await asyncio.wait_for(find(), timeout)

    async def __aenter__(self) -> EventStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Client:
    """A session with the duplex gateway.

    Use as ``async with Client("ws://127.0.0.1:8080/") as c:``; connecting waits
    for ``session_start`` (``c.session``). Then:

    * ``async for frame in c.speak("Hello")`` — speak a whole text;
    * ``u = await c.say_chunk("Hel"); await c.say_chunk("lo.", final=True)`` —
      stream text (e.g. LLM tokens) into one utterance, then iterate ``u``;
    * ``await c.pause()``, ``resume()``, ``stop()`` — playback control, safe from
      any task while frames are being iterated;
    * ``await c.send_audio(pcm)`` — microphone audio (s16le mono at ``input_rate``)
      for the server's voice activity detection and barge-in;
    * ``c.events()`` / ``on_event=`` — ``Vad``, ``Interrupted``, ``ErrorEvent``,
      ``SessionEnd`` ... as typed dataclasses.

    Args:
        url: ``ws://host:port/`` (any path; existing query parameters are kept).
        token: Auth token. Sent as ``Authorization: Bearer`` unless
            ``token_in_query`` is true, then as ``?token=`` (browsers cannot set
            headers on WebSockets, so the server accepts both).
        format: ``"binary"`` (default; raw PCM with an 8-byte header, no base64
            overhead) or ``"json"`` (base64 in ``audio`` messages).
        pacing: ``"realtime"`` (frames arrive at playback speed, so PAUSE/STOP act
            at once) or ``"asap"`` (as fast as synthesised, for offline rendering).
        model: Voice/model id (``?model=``); the server's default when ``None``.
        input_rate: Sample rate of ``send_audio`` PCM (8000/16000/24000/48000;
            the server assumes 16000 when ``None``).
        on_event: Called (sync or async) for every event, audio frames included,
            from the reader task: keep it quick.
        open_timeout: Seconds allowed for the handshake and ``session_start``.
        extra_query: More query parameters, for server options this client
            does not know yet.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        format: Format = "binary",
        pacing: Pacing = "realtime",
        model: str | None = None,
        *,
        token_in_query: bool = False,
        input_rate: int | None = None,
        on_event: EventCallback | None = None,
        open_timeout: float = 30.0,
        extra_query: dict[str, str] | None = None,
    ) -> None:
        if format not in ("json", "binary"):
            raise ValueError(f"format must be 'json' or 'binary', not {format!r}")
        if input_rate is not None and input_rate not in (8000, 16000, 24000, 48000):
            # The server refuses other rates with HTTP 400 at the handshake.
            raise ValueError(f"input_rate must be 8000, 16000, 24000 or 48000, not {input_rate}")
        if pacing not in ("realtime", "asap"):
            raise ValueError(f"pacing must be 'realtime' or 'asap', not {pacing!r}")
        self.format: Format = format
        self.pacing: Pacing = pacing
        self.model = model
        self.input_rate = input_rate
        self._token = token
        self._token_in_query = token_in_query
        self._on_event = on_event
        self._open_timeout = open_timeout
        self.url = self._build_url(url, extra_query or {})

        self.session: SessionStart | None = None
        """The ``session_start`` message, once connected."""
        self.session_end: SessionEnd | None = None
        """The ``session_end`` message, if the server ended the session."""

        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._outbox: asyncio.Queue[tuple[str | bytes, asyncio.Future[None]] | None] | None = None
        self._subscribers: set[EventStream] = set()
        self._inflight: Utterance | None = None
        self._queued: collections.deque[Utterance] = collections.deque()
        self._open: Utterance | None = None  # accepting say_chunk() text
        self._interrupted_last: Utterance | None = None
        self._closed_error: ConnectionClosed | None = None

    # ----- connection --------------------------------------------------------------------

    def _build_url(self, url: str, extra: dict[str, str]) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"url must start with ws:// or wss://, got {url!r}")
        query = dict(parse_qsl(parts.query))
        query["format"] = self.format
        query["pacing"] = self.pacing
        if self.model is not None:
            query["model"] = self.model
        if self.input_rate is not None:
            query["input_rate"] = str(self.input_rate)
        if self._token is not None and self._token_in_query:
            query["token"] = self._token
        query.update(extra)
        return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", urlencode(query), ""))

    @property
    def session_id(self) -> str | None:
        """The server's session id (``ws-<12 hex>``), once connected."""
        return self.session.session_id if self.session else None

    @property
    def connected(self) -> bool:
        """True between a successful ``connect()`` and the connection's end."""
        return self._ws is not None and self._closed_error is None

    async def connect(self) -> SessionStart:
        """Open the WebSocket and wait for ``session_start``.

        Raises ``DuplexError`` if the server answers with an ``error`` (e.g.
        ``UNAUTHORIZED``) instead, and the websockets handshake exceptions
        (``InvalidStatus`` ...) if the HTTP upgrade is refused.
        """
        if self._ws is not None:
            raise RuntimeError("already connected")
        headers = {}
        if self._token is not None and not self._token_in_query:
            headers["Authorization"] = f"Bearer {self._token}"
        ws = await connect(
            self.url,
            additional_headers=headers,
            open_timeout=self._open_timeout,
            max_size=None,
            # The server sends ~50 messages/s per session; a bigger queue than the
            # default 16 keeps a briefly busy event loop from throttling reads.
            max_queue=256,
            compression=None,
        )
        try:
            first = await asyncio.wait_for(ws.recv(), self._open_timeout)
            event = self._parse_text(first) if isinstance(first, str) else None
            if isinstance(event, ErrorEvent):
                raise DuplexError(event.code, event.message)
            if not isinstance(event, SessionStart):
                raise ProtocolError(f"expected session_start first, got {first!r:.200}")
        except BaseException:
            await ws.close()
            raise
        self._ws = ws
        self.session = event
        self._outbox = asyncio.Queue()
        self._reader = asyncio.create_task(self._read_loop(), name="duplex-reader")
        self._sender = asyncio.create_task(self._send_loop(), name="duplex-sender")
        return event

    async def close(self) -> None:
        """Close the connection; utterances not finished end with ``ConnectionClosed``."""
        ws = self._ws
        if ws is None:
            return
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        if self._sender is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._sender), 5)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - closing anyway
                self._sender.cancel()
        await ws.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._reader), 10)
            except (asyncio.TimeoutError, Exception):  # noqa: BLE001
                self._reader.cancel()
        self._shutdown(ConnectionClosed("client closed the connection"))

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def wait_closed(self) -> None:
        """Wait until the connection ends (e.g. after the server's ``session_end``)."""
        if self._reader is not None:
            await asyncio.shield(self._reader)

    # ----- sending -----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed_error is not None:
            raise self._closed_error
        if self._ws is None:
            raise RuntimeError("not connected: use 'async with Client(...)' or await connect()")

    def _enqueue(self, message: str | bytes) -> asyncio.Future[None]:
        """Queue a message for the sender task; the future resolves once it is written."""
        self._check_open()
        assert self._outbox is not None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._outbox.put_nowait((message, fut))
        return fut

    def _enqueue_text(self, text: str, final: bool) -> asyncio.Future[None]:
        return self._enqueue(json.dumps({"type": "text", "text": text, "is_final": final}))

    async def _send_loop(self) -> None:
        assert self._outbox is not None and self._ws is not None
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            message, fut = item
            try:
                await self._ws.send(message)
            except WsConnectionClosed as e:
                err = self._closed_error or ConnectionClosed(f"connection closed: {e}")
                if not fut.done():
                    fut.set_exception(err)
                self._fail_outbox(err)
                return
            except Exception as e:  # noqa: BLE001 - reported to the caller
                if not fut.done():
                    fut.set_exception(e)
                continue
            if not fut.done():
                fut.set_result(None)

    def _fail_outbox(self, err: DuplexError) -> None:
        if self._outbox is None:
            return
        while not self._outbox.empty():
            item = self._outbox.get_nowait()
            if item is not None and not item[1].done():
                item[1].set_exception(err)
                item[1].exception()  # mark retrieved: nobody may be awaiting it

    def speak(self, text: str) -> Utterance:
        """Speak ``text`` as one utterance; returns it to iterate its frames.

        Not a coroutine: the text is queued at once (utterances play in the order
        they were created), so ``async for frame in c.speak("Hi")`` works directly.
        If a streamed utterance (``say_chunk``) is still open, this one waits
        behind it until that one is finished.
        """
        if not text:
            raise ValueError("text must not be empty (the server rejects empty text)")
        self._check_open()
        u = Utterance(self)
        u._add_chunk(text, True)
        self._queued.append(u)
        self._promote()
        return u

    async def say_chunk(self, text: str, final: bool = False) -> Utterance:
        """Add ``text`` to the open streamed utterance (starting one if none is open).

        ``final=True`` closes it; the server may start speaking complete clauses
        before that. Returns the utterance, the same object for every chunk until
        it is closed. Awaits until the chunk is written when the utterance is the
        one in flight (otherwise it is held until its turn).
        """
        if not text:
            raise ValueError("text must not be empty (the server rejects empty text)")
        self._check_open()
        u = self._open
        if u is None:
            u = Utterance(self)
            self._queued.append(u)
            self._open = u
        if final:
            self._open = None
        if u is self._inflight:
            u.text += text
            u.final = final
            await self._enqueue_text(text, final)
        else:
            u._add_chunk(text, final)
            self._promote()
        return u

    @property
    def open_utterance(self) -> Utterance | None:
        """The streamed utterance ``say_chunk`` currently appends to, if any."""
        return self._open

    @property
    def current_utterance(self) -> Utterance | None:
        """The utterance in flight (its text is at the server), if any."""
        return self._inflight

    def _promote(self) -> None:
        """Send the next queued utterance when none is in flight."""
        if self._inflight is not None or not self._queued or self._closed_error is not None:
            return
        u = self._queued[0]
        chunks = u._take_chunks()
        if not chunks:
            return  # an open utterance with no text yet (cannot happen via the API)
        self._queued.popleft()
        self._inflight = u
        u.sent = True
        for text, final in chunks:
            fut = self._enqueue_text(text, final)
            fut.add_done_callback(_log_send_failure)

    async def pause(self) -> None:
        """PAUSE: no frame leaves the server after it reads this; buffered audio is kept.

        The server's pause lasts until RESUME or STOP, across utterances: a PAUSE
        sent while nothing plays holds the next utterance's first frame.
        """
        await self._enqueue(json.dumps({"type": "control", "command": "PAUSE"}))

    async def resume(self) -> None:
        """RESUME: playback continues with the next frame, nothing lost or repeated."""
        await self._enqueue(json.dumps({"type": "control", "command": "RESUME"}))

    async def stop(self) -> None:
        """STOP: end the utterance in flight now and drop every queued one.

        Queued utterances end at once (``cancelled``); the one in flight ends when
        its end marker arrives, with ``interrupted`` set (unless it had already
        finished). The session stays usable: text sent afterwards plays normally.
        """
        self._check_open()
        for u in self._queued:
            u.cancelled = True
            u._finish()
        self._queued.clear()
        self._open = None
        await self._enqueue(json.dumps({"type": "control", "command": "STOP"}))

    async def _cancel(self, u: Utterance) -> None:
        if u.done:
            return
        if u is self._inflight:
            if self._open is u:
                self._open = None
            await self._enqueue(json.dumps({"type": "control", "command": "STOP"}))
        elif u in self._queued:
            self._queued.remove(u)
            if self._open is u:
                self._open = None
            u.cancelled = True
            u._finish()

    async def send_audio(self, pcm: bytes | bytearray | memoryview) -> None:
        """Send microphone audio: s16le mono PCM at ``input_rate`` (16 kHz by default), any length.

        The server runs voice activity detection on it (``Vad`` events) and, by
        default, stops playback when the user starts talking (``Interrupted`` with
        reason ``barge_in``). Send it as it is captured (e.g. 20 ms chunks).
        """
        if len(pcm) % 2:
            raise ValueError("PCM must be whole 16-bit samples (even byte count)")
        await self._enqueue(bytes(pcm))

    async def send_json(self, message: dict[str, Any] | str) -> None:
        """Send a raw JSON message (escape hatch for protocol extensions and tests).

        Text sent this way bypasses the utterance bookkeeping: use ``speak`` or
        ``say_chunk`` for speech.
        """
        await self._enqueue(message if isinstance(message, str) else json.dumps(message))

    # ----- events ------------------------------------------------------------------------

    def events(self, include_audio: bool = False) -> EventStream:
        """Subscribe to events from now on.

        Audio frames (and end markers) are left out unless ``include_audio``: they
        also reach their ``Utterance``, and 50 per second would pile up in a
        subscriber that only waits for, say, ``Vad``.
        """
        stream = EventStream(self, include_audio)
        if self._closed_error is not None or (self._reader is not None and self._reader.done()):
            stream.close()
        else:
            self._subscribers.add(stream)
        return stream

    async def _emit(self, event: Event) -> None:
        is_audio = isinstance(event, AudioFrame)
        for s in list(self._subscribers):
            if s.include_audio or not is_audio:
                s._put(event)
        if self._on_event is not None:
            try:
                result = self._on_event(event)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # noqa: BLE001 - a callback bug must not kill the reader
                log.exception("on_event callback failed")

    # ----- receiving ---------------------------------------------------------------------

    async def _read_loop(self) -> None:
        assert self._ws is not None
        error: ConnectionClosed | None = None
        try:
            async for message in self._ws:
                try:
                    if isinstance(message, bytes):
                        event: Event = self._parse_binary(message)
                    else:
                        event = self._parse_text(message)
                except ProtocolError as e:
                    log.warning("ignoring message: %s", e)
                    continue
                await self._dispatch(event)
        except WsConnectionClosed as e:
            error = ConnectionClosed(
                f"connection closed ({e})", self.session_end.reason if self.session_end else None
            )
        except Exception as e:  # noqa: BLE001 - surfaced to every waiter
            log.exception("reader failed")
            error = ConnectionClosed(f"reader failed: {e!r}")
        reason = self.session_end.reason if self.session_end else None
        self._shutdown(error or ConnectionClosed(f"connection closed (reason: {reason})", reason))

    def _shutdown(self, error: ConnectionClosed) -> None:
        if self._closed_error is None:
            self._closed_error = error
        err = self._closed_error
        if self._inflight is not None:
            self._inflight._finish(err)
            self._inflight = None
        for u in self._queued:
            u._finish(err)
        self._queued.clear()
        self._open = None
        self._fail_outbox(err)
        if self._outbox is not None:
            self._outbox.put_nowait(None)
        for s in list(self._subscribers):
            s.close()

    @staticmethod
    def _parse_binary(data: bytes) -> AudioFrame:
        if len(data) < _HEADER.size:
            raise ProtocolError(f"binary message of {len(data)} bytes is shorter than the header")
        version, flags, _reserved, sequence = _HEADER.unpack_from(data)
        if version != _BINARY_VERSION:
            raise ProtocolError(f"unknown binary header version {version}")
        return AudioFrame(
            pcm=data[_HEADER.size :], sequence=sequence, is_final=bool(flags & _FLAG_FINAL)
        )

    @staticmethod
    def _parse_text(raw: str) -> Event:
        try:
            msg = json.loads(raw)
        except ValueError as e:
            raise ProtocolError(f"not JSON: {raw[:100]!r}") from e
        if not isinstance(msg, dict):
            raise ProtocolError(f"not a JSON object: {raw[:100]!r}")
        kind = msg.get("type")
        try:
            if kind == "audio":
                pcm = msg.get("pcm") or ""
                return AudioFrame(
                    pcm=base64.b64decode(pcm) if pcm else b"",
                    sequence=int(msg["sequence"]),
                    is_final=bool(msg.get("is_final", False)),
                    sample_rate=int(msg.get("sample_rate", SAMPLE_RATE)),
                    frame_ms=int(msg.get("frame_ms", FRAME_MS)),
                )
            if kind == "session_start":
                return SessionStart(
                    session_id=str(msg["session_id"]),
                    format=msg.get("format"),
                    pacing=msg.get("pacing"),
                    model=msg.get("model"),
                    sample_rate=int(msg.get("sample_rate", SAMPLE_RATE)),
                    frame_ms=int(msg.get("frame_ms", FRAME_MS)),
                    protocol=msg.get("protocol"),
                    raw=msg,
                )
            if kind == "vad":
                return Vad(speaking=bool(msg["speaking"]))
            if kind == "interrupted":
                return Interrupted(
                    reason=str(msg.get("reason", "")),
                    played_ms=int(msg.get("played_ms", 0)),
                    sequence=int(msg.get("sequence", 0)),
                )
            if kind == "error":
                return ErrorEvent(code=str(msg.get("code", "")), message=str(msg.get("message", "")))
            if kind == "session_end":
                return SessionEnd(reason=str(msg.get("reason", "")), session_id=msg.get("session_id"))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError(f"malformed {kind} message: {raw[:200]!r}") from e
        return UnknownEvent(type=str(kind), data=msg)

    async def _dispatch(self, event: Event) -> None:
        u = self._inflight
        if isinstance(event, AudioFrame):
            if u is None:
                # Only possible after a server-initiated end of a streamed utterance
                # while more chunks were on the way (see README, "Limitations").
                log.debug("audio frame %d with no utterance in flight: dropped", event.sequence)
            elif event.is_final:
                u.end_sequence = event.sequence
                self._inflight = None
                if self._open is u:
                    # The server ended it before the client closed it (barge-in,
                    # failure): later chunks must start a new utterance.
                    self._open = None
                barge_in = (
                    self._interrupted_last is u
                    and u.interrupted is not None
                    and u.interrupted.reason == "barge_in"
                )
                u._finish()
                if barge_in:
                    # The server drops its queue on barge-in; ours is the rest of it.
                    for q in self._queued:
                        q.cancelled = True
                        q._finish()
                    self._queued.clear()
                    self._open = None
                self._promote()
            else:
                u._frame(event)
            self._interrupted_last = None
        elif isinstance(event, Interrupted):
            if u is not None:
                u.interrupted = event
            self._interrupted_last = u
        elif isinstance(event, ErrorEvent):
            if u is not None and event.code in _UTTERANCE_ERRORS:
                u.error = DuplexError(event.code, event.message)
            else:
                log.info("server error %s: %s", event.code, event.message)
        elif isinstance(event, SessionEnd):
            self.session_end = event
        await self._emit(event)


def _log_send_failure(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.debug("send failed: %s", fut.exception())
