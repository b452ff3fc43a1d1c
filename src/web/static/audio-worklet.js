// duplex web client: the playback side, running on the audio thread.
//
// Frames arrive from the page as 1920-byte s16le buffers (20 ms at 48 kHz; the AudioContext
// runs at 48 kHz too, so there is nothing to resample). A small jitter buffer absorbs network
// and scheduling jitter: playback starts once `jitterMs` of audio is queued (or the utterance
// has ended), and if the queue runs dry while more audio is still due, that is an underrun —
// counted, reported, and playback waits for the buffer to refill instead of stuttering.
'use strict';

class DuplexPlayer extends AudioWorkletProcessor {
  constructor(options) {
    super();
    const opts = (options && options.processorOptions) || {};
    const jitterMs = opts.jitterMs || 60;
    this.target = Math.round((sampleRate * jitterMs) / 1000);
    this.queue = [];      // Int16Array chunks
    this.head = 0;        // read position in queue[0]
    this.buffered = 0;    // samples queued
    this.playing = false; // false while (re)filling the jitter buffer
    this.paused = false;
    this.streaming = false; // an utterance is under way: running dry now is an underrun
    this.underruns = 0;
    this.sinceReport = 0;
    this.port.onmessage = (e) => this.onMessage(e.data);
  }

  onMessage(m) {
    switch (m.type) {
      case 'start':
        this.streaming = true;
        break;
      case 'frame': {
        const s = new Int16Array(m.pcm);
        this.queue.push(s);
        this.buffered += s.length;
        this.streaming = true;
        break;
      }
      case 'end':
        this.streaming = false;
        break;
      case 'pause':
        this.paused = true;
        break;
      case 'resume':
        this.paused = false;
        break;
      case 'flush':
        this.queue = [];
        this.head = 0;
        this.buffered = 0;
        this.playing = false;
        this.streaming = false;
        break;
      default:
        break;
    }
  }

  process(inputs, outputs) {
    const out = outputs[0] && outputs[0][0];
    if (!out) return true;
    let i = 0;
    if (!this.paused) {
      if (!this.playing && this.buffered > 0 && (this.buffered >= this.target || !this.streaming)) {
        this.playing = true;
      }
      if (this.playing) {
        while (i < out.length && this.queue.length > 0) {
          const cur = this.queue[0];
          const n = Math.min(out.length - i, cur.length - this.head);
          for (let k = 0; k < n; k++) out[i + k] = cur[this.head + k] / 32768;
          i += n;
          this.head += n;
          this.buffered -= n;
          if (this.head >= cur.length) {
            this.queue.shift();
            this.head = 0;
          }
        }
        if (i < out.length) {
          if (this.streaming) this.underruns++;
          this.playing = false;
        }
      }
    }
    out.fill(0, i);
    this.sinceReport += out.length;
    if (this.sinceReport >= sampleRate / 10) {
      this.sinceReport = 0;
      this.port.postMessage({
        type: 'stats',
        underruns: this.underruns,
        bufferedMs: Math.round((this.buffered * 1000) / sampleRate),
      });
    }
    return true;
  }
}

registerProcessor('duplex-player', DuplexPlayer);

// The microphone side: takes the mic's samples (the context runs at 48 kHz), converts them to
// s16le and posts them to the page in 20 ms messages (960 samples), which the page sends as
// binary WebSocket messages with `input_rate=48000`. The gateway's voice-activity detection
// decides what is speech; nothing is judged here.
class DuplexMic extends AudioWorkletProcessor {
  constructor() {
    super();
    this.size = Math.round(sampleRate / 50);
    this.chunk = new Int16Array(this.size);
    this.filled = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true;
    for (let i = 0; i < input.length; i++) {
      const v = Math.max(-1, Math.min(1, input[i]));
      this.chunk[this.filled++] = Math.round(v * 32767);
      if (this.filled === this.size) {
        // Transferred, not copied: the old array is detached (length 0) afterwards.
        const out = this.chunk.buffer;
        this.port.postMessage(out, [out]);
        this.chunk = new Int16Array(this.size);
        this.filled = 0;
      }
    }
    return true;
  }
}

registerProcessor('duplex-mic', DuplexMic);
