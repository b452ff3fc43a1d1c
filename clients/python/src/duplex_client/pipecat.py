"""Pipecat TTS service backed by the duplex gateway (``pip install 'duplex-client[pipecat]'``).

Why ``TTSService`` and not ``WebsocketTTSService``/``InterruptibleTTSService``:
those bases own a raw websocket and its reconnect loop, and
``InterruptibleTTSService`` handles an interruption by *reconnecting*, because
the providers it targets cannot cancel a synthesis. The gateway can: STOP cuts
the utterance at once and reports how much was played. So this service keeps
the ``duplex_client.Client`` (which already solves frame attribution and
concurrent control) and uses the base class's audio contexts the way Pipecat's
websocket services do: ``run_tts`` sends the text and yields ``None``; a pump
task appends each received 20 ms frame to the context's queue and closes the
context after its last utterance; ``on_audio_context_interrupted`` cancels that
context's utterances (STOP for the one playing).

Each sentence Pipecat hands to ``run_tts`` becomes one gateway utterance; the
base class emits ``TTSStartedFrame`` / ``TTSAudioRawFrame`` (48 kHz mono) /
``TTSStoppedFrame`` around them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

try:
    from loguru import logger
    from pipecat.frames.frames import CancelFrame, EndFrame, Frame, StartFrame, TTSAudioRawFrame
    from pipecat.services.settings import TTSSettings
    from pipecat.services.tts_service import TTSService
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "duplex_client.pipecat needs Pipecat: pip install 'duplex-client[pipecat]'"
    ) from e

from .client import Client, Pacing, Utterance
from .errors import DuplexError
from .events import SAMPLE_RATE, Interrupted

__all__ = ["DuplexTTSService"]


class DuplexTTSService(TTSService):
    """Text-to-speech through a duplex gateway session.

    Args:
        url: The gateway, ``ws://host:port/``.
        model: Voice/model id (``?model=``), e.g. ``espeak-en-us``; server default if ``None``.
        token: Auth token (``Authorization: Bearer``; ``token_in_query`` for ``?token=``).
        pacing: ``"realtime"`` (default) lets the gateway hold the audio not yet due,
            so an interruption drops it server-side instead of in Pipecat's buffers;
            ``"asap"`` hands everything over as fast as it is synthesised.
        **kwargs: Passed to ``TTSService`` (e.g. ``text_aggregation_mode``).

    After an interruption cut an utterance, ``last_interruption`` holds the
    gateway's report (``played_ms``: how much audio had left the server, which an
    agent can use to trim its history) and the ``on_duplex_interrupted`` event
    handler is called with it::

        @tts.event_handler("on_duplex_interrupted")
        async def on_cut(tts, report):
            print(report.played_ms)
    """

    def __init__(
        self,
        *,
        url: str,
        model: str | None = None,
        token: str | None = None,
        token_in_query: bool = False,
        pacing: Pacing = "realtime",
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("settings", TTSSettings(model=model, voice=None, language=None))
        super().__init__(
            push_start_frame=True,
            push_stop_frames=True,
            sample_rate=SAMPLE_RATE,
            **kwargs,
        )
        self._url = url
        self._model = model
        self._token = token
        self._token_in_query = token_in_query
        self._pacing: Pacing = pacing
        self._client: Client | None = None
        self._pump_task: asyncio.Task[None] | None = None
        self._work: asyncio.Queue[tuple[str, Utterance]] = asyncio.Queue()
        self._context_utterances: dict[str, list[Utterance]] = {}
        self._flushed: set[str] = set()
        self._dropped: set[Utterance] = set()  # of interrupted contexts: drain, don't play
        self.last_interruption: Interrupted | None = None
        """The gateway's last ``interrupted`` report (reason, played_ms, sequence)."""
        self._register_event_handler("on_duplex_interrupted")

    def can_generate_metrics(self) -> bool:
        """TTFB and usage metrics are meaningful: audio streams per utterance."""
        return True

    @property
    def client(self) -> Client | None:
        """The underlying gateway session, while connected."""
        return self._client

    # ----- lifecycle ---------------------------------------------------------------------

    async def start(self, frame: StartFrame) -> None:
        """Connect at pipeline start, so the first sentence does not pay for the handshake."""
        await super().start(frame)
        await self._connect()

    async def stop(self, frame: EndFrame) -> None:
        """Let queued audio play out (the base class waits for it), then disconnect."""
        await super().stop(frame)
        await self._disconnect()

    async def cancel(self, frame: CancelFrame) -> None:
        """Drop everything and disconnect."""
        await super().cancel(frame)
        await self._disconnect()

    async def cleanup(self) -> None:
        """Release the connection at teardown."""
        await super().cleanup()  # type: ignore[no-untyped-call]
        await self._disconnect()

    async def _connect(self) -> None:
        if self._client is not None and self._client.connected:
            return
        client = Client(
            self._url,
            token=self._token,
            token_in_query=self._token_in_query,
            format="binary",
            pacing=self._pacing,
            model=self._model,
        )
        try:
            session = await client.connect()
        except Exception as e:  # noqa: BLE001 - reported as a Pipecat error frame
            logger.error(f"{self}: cannot connect to {self._url}: {e}")
            await self.push_error(error_msg=f"duplex: cannot connect to {self._url}: {e}")
            return
        self._client = client
        logger.debug(f"{self}: connected, session {session.session_id} model {session.model}")
        if self._pump_task is None:
            self._pump_task = self.create_task(self._pump(), name="duplex-pump")
        await self._call_event_handler("on_connected")

    async def _disconnect(self) -> None:
        if self._pump_task is not None:
            await self.cancel_task(self._pump_task)
            self._pump_task = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()
            await self._call_event_handler("on_disconnected")
        self._context_utterances.clear()
        self._flushed.clear()
        self._dropped.clear()
        self._work = asyncio.Queue()

    # ----- synthesis ---------------------------------------------------------------------

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame | None, None]:
        """Send one sentence as a gateway utterance; its audio arrives through the pump."""
        if self._client is None or not self._client.connected:
            await self._connect()
        if self._client is None:
            yield None
            return
        try:
            utterance = self._client.speak(text)
        except (DuplexError, ValueError) as e:
            await self.push_error(error_msg=f"duplex: {e}")
            yield None
            return
        self._context_utterances.setdefault(context_id, []).append(utterance)
        self._work.put_nowait((context_id, utterance))
        await self.start_tts_usage_metrics(text)
        yield None

    async def flush_audio(self, context_id: str | None = None) -> None:
        """End of the turn: the context closes once its utterances have played."""
        context_id = context_id or self.get_active_audio_context_id()
        if context_id is None:
            return
        self._flushed.add(context_id)
        await self._maybe_close_context(context_id)

    async def on_audio_context_interrupted(self, context_id: str) -> None:
        """Cancel the context's utterances: STOP the one playing, unqueue the rest."""
        for utterance in self._context_utterances.pop(context_id, []):
            self._dropped.add(utterance)
            if not utterance.done:
                try:
                    await utterance.cancel()
                except DuplexError as e:
                    logger.warning(f"{self}: could not stop utterance: {e}")
        self._flushed.discard(context_id)
        await super().on_audio_context_interrupted(context_id)

    async def _pump(self) -> None:
        """Move frames from gateway utterances into Pipecat audio contexts, in order."""
        while True:
            context_id, utterance = await self._work.get()
            try:
                async for frame in utterance:
                    if utterance in self._dropped:
                        continue  # cut: drain to the end marker without playing
                    await self.append_to_audio_context(
                        context_id,
                        TTSAudioRawFrame(frame.pcm, SAMPLE_RATE, 1, context_id=context_id),
                    )
            except DuplexError as e:
                logger.error(f"{self}: utterance failed: {e}")
                await self.push_error(error_msg=f"duplex: {e}")
            if utterance.interrupted is not None:
                report = utterance.interrupted
                self.last_interruption = report
                logger.info(
                    f"{self}: gateway stopped an utterance ({report.reason}) after "
                    f"{report.played_ms} ms ({report.sequence} frames)"
                )
                await self._call_event_handler("on_duplex_interrupted", report)
            if utterance in self._dropped:
                self._dropped.discard(utterance)
                continue
            pending = self._context_utterances.get(context_id)
            if pending is not None and utterance in pending:
                pending.remove(utterance)
            await self._maybe_close_context(context_id)

    async def _maybe_close_context(self, context_id: str) -> None:
        if context_id not in self._flushed:
            return
        if self._context_utterances.get(context_id):
            return  # utterances whose frames are not all appended yet
        # All audio of the turn has been appended: mark the context for removal
        # (the base class then pushes TTSStoppedFrame after its last frame).
        if self.audio_context_available(context_id):
            await self.remove_audio_context(context_id)
        self._context_utterances.pop(context_id, None)
        self._flushed.discard(context_id)
