"""Speak a text through a duplex gateway, save it as a WAV, and show streaming + STOP.

    duplex demo                                   # in another terminal: ws://127.0.0.1:8080/
    python examples/speak.py "Hello world" --out hello.wav
    python examples/speak.py --url ws://127.0.0.1:8080/ --model espeak-en-us "Guten Tag"
"""

from __future__ import annotations

import argparse
import asyncio
import time

from duplex_client import Client, Interrupted, Vad, write_wav


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("text", nargs="?", default="Hello from the duplex gateway.")
    p.add_argument("--url", default="ws://127.0.0.1:8080/")
    p.add_argument("--model", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--out", default="out.wav")
    args = p.parse_args()

    def on_event(event: object) -> None:
        if isinstance(event, (Interrupted, Vad)):
            print("event:", event)

    async with Client(args.url, token=args.token, model=args.model, on_event=on_event) as c:
        print(f"session {c.session_id}, voice {c.session.model if c.session else '?'}")

        # 1. A whole text: iterate its 20 ms frames as they arrive (real-time pacing).
        t0 = time.monotonic()
        frames = []
        async for frame in c.speak(args.text):
            if not frames:
                print(f"first audio after {1000 * (time.monotonic() - t0):.0f} ms")
            frames.append(frame)
        print(f"{len(frames)} frames = {len(frames) * 20} ms; saved {args.out}")
        write_wav(args.out, frames)

        # 2. Streamed text (e.g. LLM tokens) into one utterance, stopped half-way
        #    from another task while the frames are being consumed.
        u = await c.say_chunk("This sentence arrives in pieces, ")
        await c.say_chunk("and it will be cut ", final=False)
        await c.say_chunk("before it ends.", final=True)

        async def stop_soon() -> None:
            await asyncio.sleep(0.3)
            await c.stop()

        stopper = asyncio.create_task(stop_soon())
        n = sum([1 async for _ in u])
        await stopper
        print(f"streamed utterance: {n} frames before STOP; server says {u.interrupted}")


if __name__ == "__main__":
    asyncio.run(main())
