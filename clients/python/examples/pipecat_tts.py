"""A Pipecat pipeline whose TTS is the duplex gateway, offline (no cloud service).

    pip install 'duplex-client[pipecat]'
    duplex demo                                  # in another terminal
    python examples/pipecat_tts.py --out pipecat.wav

An LLM's streamed reply is simulated with LLMTextFrames; a real bot puts an LLM
before the TTS and a transport (e.g. Daily, WebRTC, local audio) after it. An
InterruptionFrame (which a transport's VAD/turn detection emits when the user
talks) makes the service STOP the gateway; the gateway's report of how much
audio had been played is available as ``tts.last_interruption``.
"""

from __future__ import annotations

import argparse
import asyncio

from pipecat.frames.frames import (
    EndFrame,
    Frame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.workers.runner import WorkerRunner

from duplex_client import Interrupted, write_wav
from duplex_client.pipecat import DuplexTTSService


class AudioSink(FrameProcessor):
    """Stands in for an output transport: keeps the audio."""

    def __init__(self) -> None:
        super().__init__()
        self.pcm: list[bytes] = []
        self.stopped = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, TTSAudioRawFrame):
            self.pcm.append(frame.audio)
        elif isinstance(frame, TTSStoppedFrame):
            self.stopped.set()
        await self.push_frame(frame, direction)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", default="ws://127.0.0.1:8080/")
    p.add_argument("--model", default=None)
    p.add_argument("--out", default="pipecat.wav")
    args = p.parse_args()

    tts = DuplexTTSService(url=args.url, model=args.model)
    sink = AudioSink()

    @tts.event_handler("on_duplex_interrupted")
    async def on_cut(service: DuplexTTSService, report: Interrupted) -> None:
        print(f"interrupted ({report.reason}) after {report.played_ms} ms of audio")

    worker = PipelineWorker(
        Pipeline([tts, sink]),
        params=PipelineParams(audio_out_sample_rate=48_000),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())

    # An LLM reply, token by token; the TTS speaks it sentence by sentence.
    await worker.queue_frames(
        [LLMFullResponseStartFrame()]
        + [LLMTextFrame(t) for t in ["Hello! ", "I am speaking ", "through the duplex ", "gateway."]]
        + [LLMFullResponseEndFrame()]
    )
    await sink.stopped.wait()
    print(f"reply: {len(sink.pcm)} audio frames")

    # The user barges in 200 ms into the next reply (the mock voice speaks 500 ms per sentence).
    await worker.queue_frame(TTSSpeakFrame("This is a long answer that the user will interrupt."))
    await asyncio.sleep(0.2)
    await worker.queue_frame(InterruptionFrame())
    await asyncio.sleep(1.0)
    print(f"total: {len(sink.pcm)} audio frames; last interruption: {tts.last_interruption}")

    write_wav(args.out, sink.pcm)
    print(f"saved {args.out}")
    await worker.queue_frame(EndFrame())
    await run


if __name__ == "__main__":
    asyncio.run(main())
