"""Typed server events.

Every message the gateway sends is turned into one of these dataclasses, so
application code can ``match`` on the type instead of poking at dicts, and a
type checker can tell which fields exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "SAMPLE_RATE",
    "FRAME_MS",
    "FRAME_BYTES",
    "SessionStart",
    "AudioFrame",
    "Vad",
    "Interrupted",
    "ErrorEvent",
    "SessionEnd",
    "UnknownEvent",
    "Event",
]

#: Output audio of the gateway: s16le mono at 48 kHz ...
SAMPLE_RATE = 48_000
#: ... in 20 ms frames ...
FRAME_MS = 20
#: ... of 960 samples = 1920 bytes.
FRAME_BYTES = SAMPLE_RATE * FRAME_MS // 1000 * 2


@dataclass(frozen=True)
class SessionStart:
    """First message of every session.

    ``raw`` keeps the whole message because the server may add keys (they are
    extensions that old clients must ignore, but new ones may want them).
    """

    session_id: str
    format: str | None = None
    pacing: str | None = None
    model: str | None = None
    sample_rate: int = SAMPLE_RATE
    frame_ms: int = FRAME_MS
    protocol: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class AudioFrame:
    """One 20 ms frame of synthesized speech (s16le mono, 48 kHz).

    ``sequence`` restarts at 1 for every utterance. The end marker that closes
    an utterance is also an ``AudioFrame``, with ``is_final=True`` and empty
    ``pcm``; ``Utterance`` iteration stops there instead of yielding it.
    """

    pcm: bytes
    sequence: int
    is_final: bool = False
    sample_rate: int = SAMPLE_RATE
    frame_ms: int = FRAME_MS

    @property
    def duration_ms(self) -> int:
        """Duration of the PCM payload (0 for the end marker)."""
        return len(self.pcm) * 1000 // (2 * self.sample_rate)


@dataclass(frozen=True)
class Vad:
    """Voice activity in the microphone audio the client sends (``send_audio``)."""

    speaking: bool


@dataclass(frozen=True)
class Interrupted:
    """Playback was cut (``reason`` is ``"stop"`` or ``"barge_in"``).

    ``played_ms`` is how much audio actually left the server before the cut,
    which is what an LLM agent needs to truncate its own history to what the
    user heard. ``sequence`` is the last frame sent.
    """

    reason: str
    played_ms: int
    sequence: int


@dataclass(frozen=True)
class ErrorEvent:
    """An ``error`` message; the session stays open after it."""

    code: str
    message: str


@dataclass(frozen=True)
class SessionEnd:
    """The server is about to close the session (``reason``: ``idle_timeout``, ``shutdown``, ...)."""

    reason: str
    session_id: str | None = None


@dataclass(frozen=True)
class UnknownEvent:
    """A message type this client version does not know (forward compatibility)."""

    type: str
    data: dict[str, Any] = field(default_factory=dict)


Event = Union[SessionStart, AudioFrame, Vad, Interrupted, ErrorEvent, SessionEnd, UnknownEvent]
