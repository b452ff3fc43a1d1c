"""Python client for the duplex real-time voice gateway.

``Client`` speaks the gateway's WebSocket protocol (JSON or binary audio
frames, PAUSE/RESUME/STOP, microphone audio with barge-in) on asyncio;
``duplex_client.pipecat`` adds a Pipecat TTS service (``pip install
'duplex-client[pipecat]'``).
"""

from .client import Client, EventStream, Utterance
from .errors import ConnectionClosed, DuplexError, ProtocolError
from .events import (
    FRAME_BYTES,
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
from .wav import read_wav, write_wav

__version__ = "0.1.0"

__all__ = [
    "Client",
    "Utterance",
    "EventStream",
    "DuplexError",
    "ConnectionClosed",
    "ProtocolError",
    "AudioFrame",
    "SessionStart",
    "Vad",
    "Interrupted",
    "ErrorEvent",
    "SessionEnd",
    "UnknownEvent",
    "Event",
    "SAMPLE_RATE",
    "FRAME_MS",
    "FRAME_BYTES",
    "write_wav",
    "read_wav",
]
