"""DuplexTTSService in a real, offline Pipecat pipeline: [DuplexTTSService, collector].

No cloud service is involved: text frames are queued into the pipeline task and
the gateway's mock voice (25 frames per utterance) speaks them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

pytest.importorskip(
    "pipecat", reason="pipecat-ai is not installed (pip install 'duplex-client[pipecat]')"
)

from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from duplex_client import FRAME_BYTES, Interrupted  # noqa: E402
from duplex_client.pipecat import DuplexTTSService  # noqa: E402

MOCK_FRAMES = 25
WAIT = 60.0


class Collector(FrameProcessor):
    """Records the TTS frames that reach the end of the pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: list[Frame] = []

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, (TTSAudioRawFrame, TTSStartedFrame, TTSStoppedFrame, InterruptionFrame)):
            self.frames.append(frame)
        await self.push_frame(frame, direction)

    def audio(self) -> list[TTSAudioRawFrame]:
        return [f for f in self.frames if isinstance(f, TTSAudioRawFrame)]

    def count(self, kind: type[Frame]) -> int:
        return sum(isinstance(f, kind) for f in self.frames)


class Bot:
    def __init__(self, tts: DuplexTTSService, collector: Collector, worker: PipelineWorker) -> None:
        self.tts, self.collector, self.worker = tts, collector, worker

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not cond():
            assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
            await asyncio.sleep(0.01)


@pytest.fixture
async def bot(demo_url: str) -> AsyncIterator[Bot]:
    tts = DuplexTTSService(url=demo_url, model="mock-440hz")
    collector = Collector()
    worker = PipelineWorker(
        Pipeline([tts, collector]),
        params=PipelineParams(audio_out_sample_rate=48_000),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    yield Bot(tts, collector, worker)
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, WAIT)


async def test_speak_frame_becomes_audio(bot: Bot) -> None:
    c = bot.collector
    await bot.worker.queue_frames([TTSSpeakFrame("Hello from the gateway.")])
    await bot.until(lambda: c.count(TTSStoppedFrame) == 1)
    audio = c.audio()
    assert len(audio) == MOCK_FRAMES
    assert all(f.sample_rate == 48_000 and f.num_channels == 1 for f in audio)
    assert all(len(f.audio) == FRAME_BYTES for f in audio)
    assert isinstance(c.frames[0], TTSStartedFrame) and isinstance(c.frames[-1], TTSStoppedFrame)
    assert bot.tts.client is not None and bot.tts.client.session_id is not None


async def test_llm_text_is_spoken_sentence_by_sentence(bot: Bot) -> None:
    c = bot.collector
    await bot.worker.queue_frames(
        [
            LLMFullResponseStartFrame(),
            LLMTextFrame("The first sentence. "),
            LLMTextFrame("And a "),
            LLMTextFrame("second one."),
            LLMFullResponseEndFrame(),
        ]
    )
    await bot.until(lambda: c.count(TTSStoppedFrame) == 1)
    # Two sentences = two gateway utterances of 25 frames, in one TTS context.
    assert len(c.audio()) == 2 * MOCK_FRAMES
    assert c.count(TTSStartedFrame) == 1


async def test_interruption_stops_the_audio(bot: Bot) -> None:
    c = bot.collector
    reports: list[Interrupted] = []

    @bot.tts.event_handler("on_duplex_interrupted")
    async def on_cut(tts: DuplexTTSService, report: Interrupted) -> None:
        reports.append(report)

    await bot.worker.queue_frames([TTSSpeakFrame("This will be cut short.")])
    await bot.until(lambda: len(c.audio()) >= 5)
    await bot.worker.queue_frame(InterruptionFrame())
    await bot.until(lambda: bot.tts.last_interruption is not None)
    cut = len(c.audio())
    await asyncio.sleep(1.0)  # longer than the rest of the utterance would take
    assert len(c.audio()) == cut, "audio kept arriving after the interruption"
    assert 5 <= cut < MOCK_FRAMES
    report = bot.tts.last_interruption
    assert report is not None and report.reason == "stop"
    assert 5 * 20 <= report.played_ms < MOCK_FRAMES * 20
    assert reports == [report]
    assert c.count(InterruptionFrame) == 1
    # The service keeps working after the interruption.
    c.frames.clear()
    await bot.worker.queue_frames([TTSSpeakFrame("Back again.")])
    await bot.until(lambda: c.count(TTSStoppedFrame) == 1)
    assert len(c.audio()) == MOCK_FRAMES
