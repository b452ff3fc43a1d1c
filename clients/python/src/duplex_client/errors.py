"""Exceptions raised by the duplex client.

The gateway reports problems as ``error`` messages carrying a fixed ``code``
(``INVALID_MESSAGE``, ``WORKER_UNAVAILABLE``, ``SYNTHESIS_FAILED``, ...). Keeping
that code on the exception lets callers switch on it instead of parsing text.
"""

from __future__ import annotations

__all__ = ["DuplexError", "ConnectionClosed", "ProtocolError"]


class DuplexError(Exception):
    """An error reported by the gateway (or by the client on its behalf).

    Attributes:
        code: The protocol's error code, e.g. ``"SYNTHESIS_FAILED"``; client-side
            conditions use their own codes (``"CONNECTION_CLOSED"``, ``"PROTOCOL"``).
        message: Human-readable text from the server.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConnectionClosed(DuplexError):
    """The WebSocket closed while something was still waiting on it.

    Attributes:
        reason: The ``session_end`` reason when the server announced the close
            (``idle_timeout``, ``max_duration``, ``shutdown``, ...), else ``None``.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__("CONNECTION_CLOSED", message)
        self.reason = reason


class ProtocolError(DuplexError):
    """The server sent something this client cannot interpret (e.g. an unknown binary header version)."""

    def __init__(self, message: str) -> None:
        super().__init__("PROTOCOL", message)
