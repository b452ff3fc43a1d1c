#!/usr/bin/env python3
"""Writes the hand-made seed inputs of every fuzz target into corpus/<target>/.

The seeds are real protocol bytes (what a browser, a worker, espeak-ng or Redis would hand the
gateway), kept small; the fuzz targets derive their chunking from the input itself, so no
control prefix is needed. Run from fuzz/: `python3 make_seeds.py` (idempotent).
"""
import json
import math
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tone(rate, ms, amp, freq=300.0):
    n = rate * ms // 1000
    return b"".join(
        struct.pack("<h", int(round(math.sin(2 * math.pi * freq * i / rate) * amp * 32767)))
        for i in range(n)
    )


# --- handshake: request heads -------------------------------------------------------------
CHROME = (
    "GET /?format=binary&pacing=asap&model=mock-440hz&input_rate=16000 HTTP/1.1\r\n"
    "Host: localhost:8080\r\n"
    "Connection: Upgrade\r\n"
    "Pragma: no-cache\r\n"
    "Cache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36\r\n"
    "Upgrade: websocket\r\n"
    "Origin: http://localhost:8080\r\n"
    "Sec-WebSocket-Version: 13\r\n"
    "Accept-Encoding: gzip, deflate, br, zstd\r\n"
    "Accept-Language: en-US,en;q=0.9\r\n"
    "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    "\r\n"
)
put("handshake", "upgrade-chrome.http", CHROME)
put(
    "handshake",
    "upgrade-rfc6455.http",
    "GET /chat HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    "Origin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n",
)
# Firefox sends "keep-alive, Upgrade"; a first frame may arrive with the head.
put(
    "handshake",
    "upgrade-firefox-with-frame.http",
    "GET /?format=json&pacing=realtime HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
    "Connection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: AQIDBAUGBwgJCgsMDQ4PEA==\r\nAuthorization: Bearer s3cr3t\r\n\r\n"
    + "\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58",
)
put("handshake", "health.http", "GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
put(
    "handshake",
    "metrics-curl.http",
    "GET /metrics HTTP/1.1\r\nHost: localhost:8080\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n",
)
put(
    "handshake",
    "query-escapes.http",
    "GET /?model=caf%C3%A9+%E2%82%AC&a=a%2&b=%zz&d=%&e=%20&f&=x&input_rate=08000 HTTP/1.1\r\n"
    "Host: x\r\nUpgrade: WebSocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n"
    "Sec-WebSocket-Key: \r\n\r\n",
)
put("handshake", "post-body.http", "POST /ws HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
put("handshake", "partial.http", "GET /?format=binary HTTP/1.1\r\nHost: x\r\nUpgr")
put("handshake", "http10-lf-only.http", "GET / HTTP/1.0\nUpgrade: websocket\n\n")
put("handshake", "tls-client-hello.bin", bytes.fromhex("16030100c4010000c00303") + bytes(range(32)))

# --- ws_decoder: client frames (always masked) ----------------------------------------------
def frame(opcode, payload, fin=True, mask=b"\x37\xfa\x21\x3d", rsv=0, len_form=None):
    b0 = (0x80 if fin else 0) | rsv | opcode
    n = len(payload)
    out = bytearray([b0])
    m = 0x80 if mask is not None else 0
    form = len_form or (7 if n < 126 else 16 if n < 65536 else 64)
    if form == 7:
        out.append(m | n)
    elif form == 16:
        out.append(m | 126)
        out += struct.pack(">H", n)
    else:
        out.append(m | 127)
        out += struct.pack(">Q", n)
    if mask is not None:
        out += mask
        out += bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    else:
        out += payload
    return bytes(out)


TEXT = json.dumps({"type": "text", "text": "Hello there. How are you?"}).encode()
put("ws_decoder", "text-message.bin", frame(1, TEXT))
put("ws_decoder", "binary-mic-20ms.bin", frame(2, tone(16000, 20, 0.3)))
put(
    "ws_decoder",
    "fragmented-text-with-ping.bin",
    frame(1, b'{"type":"text",', fin=False)
    + frame(9, b"keepalive")
    + frame(0, b'"text":"split', fin=False)
    + frame(0, b' message"}'),
)
put(
    "ws_decoder",
    "control-sequence.bin",
    frame(9, b"hb") + frame(10, b"") + frame(1, b'{"type":"control","command":"PAUSE"}')
    + frame(8, struct.pack(">H", 1000) + b"bye"),
)
put("ws_decoder", "medium-16bit-length.bin", frame(2, bytes(range(256)) + bytes(44)))
put("ws_decoder", "nonminimal-64bit-length.bin", frame(1, b'{"type":"control","command":"STOP"}', len_form=64))
put("ws_decoder", "unmasked-text.bin", frame(1, b"hi", mask=None))
put("ws_decoder", "invalid-utf8.bin", frame(1, b"\xff\xfe\xfd"))
put("ws_decoder", "close-going-away.bin", frame(8, struct.pack(">H", 1001)))
put("ws_decoder", "rsv1-compressed.bin", frame(1, b"x", rsv=0x40))
put("ws_decoder", "oversized-ping.bin", frame(9, bytes(130)))
put("ws_decoder", "two-binary-pieces.bin", frame(2, tone(16000, 5, 0.5), fin=False) + frame(0, tone(16000, 5, 0.5)))

# --- protocol: client JSON, server events, binary audio -----------------------------------
for name, obj in [
    ("text.json", {"type": "text", "text": "Hello, world. This is duplex."}),
    ("text-streamed.json", {"type": "text", "text": "The cat", "is_final": False}),
    ("text-unicode.json", {"type": "text", "text": "Grüße, 世界! \u00e9\U0001F600"}),
    ("control-pause.json", {"type": "control", "command": "PAUSE"}),
    ("control-resume.json", {"type": "control", "command": "RESUME"}),
    ("control-stop.json", {"type": "control", "command": "STOP"}),
    ("session-start.json", {"type": "session_start", "session_id": "ws-0123456789ab", "format": "binary",
                            "pacing": "realtime", "model": "mock-440hz", "sample_rate": 48000,
                            "frame_ms": 20, "protocol": 1}),
    ("audio.json", {"type": "audio", "pcm": "AAABAAIAAwA=", "sample_rate": 48000, "frame_ms": 20,
                    "sequence": 7}),
    ("audio-end.json", {"type": "audio", "pcm": "", "sample_rate": 48000, "frame_ms": 20,
                        "sequence": 26, "is_final": True}),
    ("error.json", {"type": "error", "message": "field 'text' must not be empty", "code": "INVALID_MESSAGE"}),
    ("interrupted.json", {"type": "interrupted", "reason": "barge_in", "played_ms": 140, "sequence": 7}),
    ("vad.json", {"type": "vad", "speaking": True}),
    ("session-end.json", {"type": "session_end", "session_id": "ws-1", "reason": "idle_timeout"}),
    ("unknown-type.json", {"type": "from_the_future", "x": [1, 2.5, None]}),
]:
    put("protocol", name, json.dumps(obj, ensure_ascii=False))
put("protocol", "not-json.txt", "PAUSE")
put("protocol", "binary-audio.bin", bytes([1, 0, 0, 0]) + struct.pack("<I", 3) + tone(48000, 2, 0.2))
put("protocol", "binary-end.bin", bytes([1, 1, 0, 0]) + struct.pack("<I", 26))

# --- vad: s16le microphone audio ------------------------------------------------------------
put("vad", "tone-100ms-16k.raw", tone(16000, 100, 0.3))
put("vad", "speech-pause-speech-8k.raw", tone(8000, 80, 0.3) + bytes(8000 * 2 * 60 // 1000) + tone(8000, 80, 0.5, 180))
put("vad", "quiet-noise-16k.raw", tone(16000, 60, 0.003))
put("vad", "odd-length.raw", tone(24000, 30, 0.4) + b"\x7f")
put("vad", "full-scale-square.raw", (struct.pack("<h", 32767) * 4 + struct.pack("<h", -32768) * 4) * 200)


# --- grpc_codec: length-prefixed protobuf messages ------------------------------------------
def varint(n):
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def fld(num, wire, value):
    key = varint(num << 3 | wire)
    if wire == 0:
        return key + varint(value)
    if wire == 1:
        return key + struct.pack("<d", value)
    return key + varint(len(value)) + value


def grpc(msg, flag=0):
    return bytes([flag]) + struct.pack(">I", len(msg)) + msg


def audio_frame(seq, pcm, final=False, sid=b"ws-0123456789ab"):
    m = fld(1, 2, sid) + fld(2, 2, pcm) + fld(3, 0, 48000) + fld(4, 0, 20) + fld(5, 0, seq)
    if final:
        m += fld(6, 0, 1)
    return m


put("grpc_codec", "audio-frame.grpc", grpc(audio_frame(1, tone(48000, 20, 0.3))))
put(
    "grpc_codec",
    "three-frames-and-end.grpc",
    grpc(audio_frame(1, tone(48000, 2, 0.3))) + grpc(audio_frame(2, tone(48000, 2, 0.2)))
    + grpc(audio_frame(3, b"", final=True)),
)
caps = (fld(1, 0, 1) + fld(4, 0, 1) + fld(5, 2, b"en") + fld(5, 2, b"de") + fld(7, 0, 64))
metric = lambda k, v: fld(3, 2, fld(1, 2, k) + fld(2, 1, v))
put(
    "grpc_codec",
    "capabilities.grpc",
    grpc(fld(1, 2, caps) + fld(2, 2, b"mock-440hz") + metric(b"rtf", 0.02) + metric(b"queue_depth", 5.0)),
)
model = fld(1, 2, b"mock-440hz") + fld(2, 2, b"mock") + fld(3, 0, 1) + fld(4, 2, b"en") + fld(
    5, 2, fld(1, 2, b"sr") + fld(2, 2, b"48000"))
put("grpc_codec", "list-models.grpc", grpc(fld(1, 2, model) + fld(1, 2, model)))
put("grpc_codec", "text-chunk-and-empty.grpc",
    grpc(fld(1, 2, b"ws-1") + fld(2, 2, b"Hello there.") + fld(3, 0, 1) + fld(4, 0, 1)) + grpc(b""))
put("grpc_codec", "negative-sequence.grpc", grpc(audio_frame(-1, b"\x01\x02")))
put("grpc_codec", "compressed-flag.grpc", grpc(audio_frame(1, b"\x00\x00"), flag=1))
put("grpc_codec", "truncated.grpc", grpc(audio_frame(9, tone(48000, 1, 0.3)))[:-7])

# --- registry_record: the JSON a worker writes to Redis -------------------------------------
REC = {
    "name": "tts-a-7001",
    "addr": "grpc://10.0.0.5:7001",
    "capabilities": {"streaming": True, "zero_shot": False, "lora": False, "cpu_ok": True,
                     "languages": ["en", "de"], "emotive_zero_prompt": False},
    "resident_models": ["mock-440hz"],
    "metrics": {"rtf": 0.25, "queue_depth": 3, "gpu_mem_mb": 512.5, "max_concurrent_sessions": 64},
    "last_heartbeat_ts": 1712345678.25,
}
put("registry_record", "record.json", json.dumps(REC, separators=(",", ":")))
r2 = json.loads(json.dumps(REC))
r2.update(addr="grpc://[::1]:7001", resident_models=[], last_heartbeat_ts=1712345678)
r2["metrics"] = {"rtf": 1, "queue_depth": 0}
r2["capabilities"]["languages"] = []
put("registry_record", "record-ipv6-integers.json", json.dumps(r2, indent=2))
r3 = json.loads(json.dumps(REC))
r3["version"] = 2
put("registry_record", "record-extra-key.json", json.dumps(r3))
r4 = json.loads(json.dumps(REC))
r4["metrics"]["rtf"] = 1e308
r4["last_heartbeat_ts"] = -0.0
put("registry_record", "record-extreme-numbers.json", json.dumps(r4))
put("registry_record", "not-an-object.json", '["grpc://h:1"]')


# --- wav: espeak-ng --stdout ----------------------------------------------------------------
def wav(rate, pcm, riff_size=None, data_size=None, extra=b"", channels=1, bits=16):
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * 2 * channels, 2 * channels, bits)
    riff_size = riff_size if riff_size is not None else 36 + len(extra) + len(pcm)
    data_size = data_size if data_size is not None else len(pcm)
    return (b"RIFF" + struct.pack("<I", riff_size) + b"WAVEfmt " + struct.pack("<I", 16) + fmt
            + extra + b"data" + struct.pack("<I", data_size) + pcm)


put("wav", "espeak-stdout-22050.wav", wav(22050, tone(22050, 20, 0.3), 0x7FFFF024, 0x7FFFF000))
put("wav", "exact-sizes-16000.wav", wav(16000, tone(16000, 10, 0.5)))
put("wav", "list-chunk-odd-size.wav", wav(16000, b"\x01\x00\x02\x00\x03", extra=b"LIST" + struct.pack("<I", 3) + b"abc\0"))
put("wav", "stereo-unsupported.wav", wav(44100, b"\x00" * 16, channels=2))
put("wav", "header-only.wav", wav(22050, b"", 0x7FFFF024, 0x7FFFF000))
put("wav", "riff-prefix.bin", b"RIF")

# --- clauses: streamed text -----------------------------------------------------------------
put("clauses", "sentences.txt", "Hello world. How are you? Fine!")
put("clauses", "abbreviations.txt", "Dr. Smith met J. Doe, e.g. at noon. Then left. Pi is 3.14 roughly.")
put("clauses", "quotes.txt", 'He said "stop." She didn\'t. (Really!) «Oui.» Done…')
put("clauses", "long-comma.txt",
    "This first part of the sentence is quite long indeed, and this is the rest; then more: yes.")
put("clauses", "lines.txt", "first line\nsecond line\n\n... !\nthird")
put("clauses", "cjk.txt", "你好。再见！好吗？是的；")
put("clauses", "wall.txt", "word " * 60 + "é" * 250)
put("clauses", "terminator-at-end.txt", "The cat sat.")
