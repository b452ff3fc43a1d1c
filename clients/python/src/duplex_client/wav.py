"""WAV helpers (stdlib ``wave``), for saving what the gateway said or loading test input."""

from __future__ import annotations

import os
import wave
from collections.abc import Iterable

from .events import SAMPLE_RATE, AudioFrame

__all__ = ["write_wav", "read_wav"]


def write_wav(
    path: str | os.PathLike[str],
    frames: Iterable[AudioFrame | bytes],
    sample_rate: int = SAMPLE_RATE,
) -> int:
    """Write frames (``AudioFrame`` objects or raw s16le mono PCM chunks) to a WAV file.

    End markers contribute nothing (their PCM is empty), so the frames of a whole
    utterance can be passed as collected. Returns the number of PCM bytes written.
    """
    written = 0
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        for f in frames:
            pcm = f.pcm if isinstance(f, AudioFrame) else bytes(f)
            if pcm:
                w.writeframes(pcm)
                written += len(pcm)
    return written


def read_wav(path: str | os.PathLike[str]) -> tuple[bytes, int]:
    """Read a mono 16-bit WAV file; returns ``(pcm, sample_rate)``.

    Raises ``ValueError`` for other layouts rather than silently handing the
    gateway audio it would misinterpret.
    """
    with wave.open(os.fspath(path), "rb") as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(
                f"{os.fspath(path)}: need mono 16-bit PCM, got {w.getnchannels()} channel(s), "
                f"{8 * w.getsampwidth()}-bit"
            )
        return w.readframes(w.getnframes()), w.getframerate()
