// duplex web client: connects to the gateway that served this page, sends text and
// Pause/Resume/Stop, receives binary audio frames (`?format=binary`: an 8-byte header —
// version, flags with bit 0 = final, 2 reserved bytes, u32 LE sequence — then 1920 bytes of
// s16le PCM) and hands them to the AudioWorklet player. Shows the figures a person wants to
// see: first-audio latency, frames, underruns, state.
'use strict';

const $ = (id) => document.getElementById(id);
const JITTER_MS = 60;

const view = {
  text: $('text'), model: $('model'), state: $('state'), fal: $('fal'), frames: $('frames'),
  underruns: $('underruns'), buffered: $('buffered'), voice: $('voice'), you: $('you'),
  note: $('note'), log: $('log'), level: $('level'), spark: $('spark'), voices: $('voices'),
};
const buttons = {
  speak: $('speak'), pause: $('pause'), resume: $('resume'), stop: $('stop'), mic: $('mic'),
};

let ws = null; // the open session
let wsModel = null; // the model asked for in its URL
let ctx = null;
let player = null;
let pending = []; // utterances sent and not ended: { sentAt, first }
let frames = 0;
let state = 'idle';
let discarding = false; // after Stop: frames already in flight are dropped until the end marker
let mic = null; // { stream, node } while the microphone is on
let micChunks = 0; // 20 ms microphone messages sent (shown in the log when the mic stops)
let bargedIn = false; // the gateway interrupted playback because the user spoke

// Live figures beside the counters: the level of the audio as it arrives, and a sparkline of
// each utterance's first-audio latency and frame arrival jitter.
const history = []; // { fal, jitter } per finished utterance, newest last (at most 40)
let gaps = []; // ms between frame arrivals in the current utterance
let lastArrival = null;

function frameLevel(pcm) {
  const s = new Int16Array(pcm);
  let sum = 0;
  for (let i = 0; i < s.length; i += 4) sum += s[i] * s[i];
  const rms = Math.sqrt(sum / Math.max(1, s.length / 4)) / 32768;
  return rms > 0 ? Math.max(-60, 20 * Math.log10(rms)) : -60;
}

function finishUtterance(cur) {
  if (!cur || cur.first === null) return;
  const sorted = gaps.map((g) => Math.abs(g - 20)).sort((a, b) => a - b);
  const jitter = sorted.length ? sorted[Math.floor(sorted.length * 0.95)] : 0;
  history.push({ fal: cur.first - cur.sentAt, jitter });
  if (history.length > 40) history.shift();
  gaps = [];
  lastArrival = null;
  drawSpark();
}

function drawSpark() {
  const c = view.spark;
  const g = c.getContext('2d');
  g.clearRect(0, 0, c.width, c.height);
  if (!history.length) return;
  const top = Math.max(50, ...history.map((h) => Math.max(h.fal, h.jitter)));
  const w = c.width / 40;
  g.fillStyle = '#4a7';
  history.forEach((h, i) => {
    const bh = (h.fal / top) * (c.height - 4);
    g.fillRect(i * w + 1, c.height - bh, w - 2, bh);
  });
  g.strokeStyle = '#c43';
  g.beginPath();
  history.forEach((h, i) => {
    const y = c.height - (h.jitter / top) * (c.height - 4);
    if (i === 0) g.moveTo(i * w + w / 2, y);
    else g.lineTo(i * w + w / 2, y);
  });
  g.stroke();
  g.fillStyle = '#333';
  g.fillText(`${Math.round(top)} ms`, 4, 10);
}

// The voice picker lists what the workers offer (GET /voices).
async function loadVoices() {
  try {
    const r = await fetch('/voices');
    const { voices } = await r.json();
    view.voices.replaceChildren(...voices.map((v) => {
      const o = document.createElement('option');
      o.value = v;
      return o;
    }));
    log(`voices: ${voices.join(', ') || '(none listed yet)'}`);
  } catch (e) {
    log(`voices: ${e}`);
  }
}
loadVoices();

function log(msg) {
  const t = new Date().toISOString().slice(11, 23);
  view.log.textContent = `${t} ${msg}\n${view.log.textContent}`.slice(0, 20000);
}

function note(msg) {
  view.note.hidden = !msg;
  view.note.textContent = msg || '';
}

function setState(s) {
  state = s;
  view.state.textContent = s;
  buttons.pause.disabled = !(s === 'waiting' || s === 'speaking');
  buttons.resume.disabled = s !== 'paused';
  buttons.stop.disabled = !(s === 'waiting' || s === 'speaking' || s === 'paused');
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

// Audio is optional: without it (no AudioWorklet outside a secure context, no output device)
// the page still receives and counts frames, and says why it is silent.
let audioProblem = ''; // why there is no playback, if there is none

function reportAudioState() {
  if (!player) note(audioProblem);
  else if (ctx.state === 'running') note('');
  else note('The browser keeps audio suspended (no output device, or autoplay blocked); frames are still received and counted.');
}

async function ensureAudio() {
  if (ctx) {
    if (ctx.state === 'suspended') await Promise.race([ctx.resume(), sleep(300)]).catch(() => {});
    reportAudioState();
    return;
  }
  try {
    if (!window.AudioContext) throw new Error('this browser has no Web Audio');
    ctx = new AudioContext({ sampleRate: 48000, latencyHint: 'interactive' });
    if (!ctx.audioWorklet) throw new Error('AudioWorklet needs a secure context (https or localhost)');
    await ctx.audioWorklet.addModule('/audio-worklet.js');
    player = new AudioWorkletNode(ctx, 'duplex-player', {
      numberOfInputs: 0,
      outputChannelCount: [1],
      processorOptions: { jitterMs: JITTER_MS },
    });
    player.port.onmessage = (e) => onPlayer(e.data);
    player.connect(ctx.destination);
    await Promise.race([ctx.resume(), sleep(300)]);
    log(`audio: ${ctx.sampleRate} Hz, ${JITTER_MS} ms jitter buffer, context ${ctx.state}`);
    ctx.addEventListener('statechange', reportAudioState);
    reportAudioState();
  } catch (e) {
    player = null;
    audioProblem = `No audio playback (${e.message}); frames are still received and counted.`;
    note(audioProblem);
    log(`audio unavailable: ${e.message}`);
  }
}

function onPlayer(m) {
  if (m.type === 'stats') {
    view.underruns.textContent = String(m.underruns);
    view.buffered.textContent = `${m.bufferedMs} ms`;
  }
}

function connect(model) {
  return new Promise((resolve, reject) => {
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    // Microphone audio goes out at the context's 48 kHz.
    let url = `${scheme}://${location.host}/?format=binary&input_rate=48000`;
    if (model) url += `&model=${encodeURIComponent(model)}`;
    const sock = new WebSocket(url);
    sock.binaryType = 'arraybuffer';
    let started = false;
    const timer = setTimeout(() => {
      if (!started) {
        sock.close();
        reject(new Error('no session_start within 10 s'));
      }
    }, 10000);
    sock.onmessage = (e) => {
      if (typeof e.data !== 'string') {
        onAudio(e.data);
        return;
      }
      let m;
      try {
        m = JSON.parse(e.data);
      } catch (err) {
        log(`unparsable message: ${e.data}`);
        return;
      }
      if (!started && m.type === 'session_start') {
        started = true;
        clearTimeout(timer);
        view.voice.textContent = m.model || '(server default)';
        log(`session ${m.session_id}, model ${m.model || '?'}`);
        resolve(sock);
        return;
      }
      onJson(m);
    };
    sock.onerror = () => {
      if (!started) reject(new Error(`cannot connect to ${url}`));
    };
    sock.onclose = (e) => {
      clearTimeout(timer);
      if (!started) {
        reject(new Error(`connection closed (${e.code})`));
        return;
      }
      if (ws === sock) {
        ws = null;
        pending = [];
        if (state !== 'done' && state !== 'idle') setState('closed');
        log(`connection closed (${e.code})`);
      }
    };
  });
}

function onAudio(buf) {
  const dv = new DataView(buf);
  if (buf.byteLength < 8 || dv.getUint8(0) !== 1) {
    log(`unexpected binary message of ${buf.byteLength} bytes`);
    return;
  }
  const final = (dv.getUint8(1) & 1) === 1;
  if (discarding) {
    if (final) discarding = false;
    return;
  }
  if (buf.byteLength > 8) {
    const cur = pending[0];
    if (cur && cur.first === null) {
      cur.first = performance.now();
      view.fal.textContent = `${Math.round(cur.first - cur.sentAt)} ms`;
    }
    frames += 1;
    view.frames.textContent = String(frames);
    const now = performance.now();
    if (lastArrival !== null) gaps.push(now - lastArrival);
    lastArrival = now;
    view.level.value = frameLevel(buf.slice(8));
    if (player) {
      const pcm = buf.slice(8);
      player.port.postMessage({ type: 'frame', pcm }, [pcm]);
    }
    if (state === 'waiting') setState('speaking');
  }
  if (final) {
    finishUtterance(pending.shift());
    view.level.value = -60;
    if (bargedIn) {
      // The user's speech ended the utterance: what is still buffered must not play.
      bargedIn = false;
      if (player) player.port.postMessage({ type: 'flush' });
      if (player) player.port.postMessage({ type: 'resume' });
      pending = [];
      setState('interrupted');
      return;
    }
    if (player) player.port.postMessage({ type: 'end' });
    if (pending.length === 0 && state !== 'stopped') setState('done');
  }
}

function onJson(m) {
  switch (m.type) {
    case 'error':
      note(`${m.code}: ${m.message}`);
      log(`error ${m.code}: ${m.message}`);
      break;
    case 'interrupted':
      log(`interrupted (${m.reason}) after ${m.played_ms} ms`);
      if (m.reason === 'barge_in') {
        // Hold playback at once; the end marker that follows (barge-in "stop") flushes it,
        // Resume continues it (barge-in "pause").
        bargedIn = true;
        if (player) player.port.postMessage({ type: 'pause' });
        setState('paused');
      }
      break;
    case 'vad':
      view.you.textContent = m.speaking ? 'speaking' : 'silent';
      break;
    case 'session_end':
      log(`session ended: ${m.reason}`);
      note(`The gateway ended the session (${m.reason}).`);
      break;
    default:
      break;
  }
}

function send(obj) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(obj));
}

// Opens (or reopens, when the voice changed) the session.
async function ensureSession() {
  const model = view.model.value.trim();
  if (!ws || ws.readyState !== WebSocket.OPEN || model !== wsModel) {
    if (ws) ws.close();
    ws = null;
    pending = [];
    discarding = false;
    setState('connecting');
    ws = await connect(model);
    wsModel = model;
    setState('idle');
  }
}

buttons.speak.addEventListener('click', async () => {
  const text = view.text.value.trim();
  if (!text) {
    note('Type something to say.');
    return;
  }
  note('');
  buttons.speak.disabled = true;
  try {
    await ensureAudio();
    await ensureSession();
    if (pending.length === 0) {
      frames = 0;
      view.frames.textContent = '0';
      view.fal.textContent = '…';
      if (player) player.port.postMessage({ type: 'start' });
    }
    pending.push({ sentAt: performance.now(), first: null });
    send({ type: 'text', text });
    if (state !== 'speaking' && state !== 'paused') setState('waiting');
  } catch (e) {
    note(`Cannot reach the gateway: ${e.message}`);
    setState('error');
  } finally {
    buttons.speak.disabled = false;
  }
});

buttons.pause.addEventListener('click', () => {
  send({ type: 'control', command: 'PAUSE' });
  if (player) player.port.postMessage({ type: 'pause' });
  setState('paused');
});

buttons.resume.addEventListener('click', () => {
  bargedIn = false;
  send({ type: 'control', command: 'RESUME' });
  if (player) player.port.postMessage({ type: 'resume' });
  setState(pending.length > 0 ? 'speaking' : 'done');
});

buttons.stop.addEventListener('click', () => {
  send({ type: 'control', command: 'STOP' });
  if (player) player.port.postMessage({ type: 'flush' });
  discarding = pending.length > 0;
  pending = [];
  setState('stopped');
});

setState('idle');

async function micOn() {
  await ensureAudio();
  if (!player) throw new Error(audioProblem || 'no audio context');
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new Error('this browser cannot capture audio here (needs https or localhost)');
  }
  const stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  // Keep the session that is playing, whatever the voice field says now.
  if (!ws || ws.readyState !== WebSocket.OPEN) await ensureSession();
  const node = new AudioWorkletNode(ctx, 'duplex-mic', { numberOfInputs: 1, numberOfOutputs: 0 });
  node.onprocessorerror = () => log('microphone processor failed');
  node.port.onmessage = (e) => {
    micChunks += 1;
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(e.data);
  };
  ctx.createMediaStreamSource(stream).connect(node);
  mic = { stream, node };
  view.you.textContent = 'silent';
  log('microphone on: speech interrupts playback');
}

function micOff() {
  if (!mic) return;
  mic.node.port.onmessage = null;
  mic.node.disconnect();
  for (const t of mic.stream.getTracks()) t.stop();
  mic = null;
  view.you.textContent = '–';
  log(`microphone off (${micChunks} messages of 20 ms sent)`);
}

buttons.mic.addEventListener('click', async () => {
  buttons.mic.disabled = true;
  try {
    if (mic) micOff();
    else await micOn();
  } catch (e) {
    note(`Microphone unavailable: ${e.message}`);
    log(`microphone unavailable: ${e.message}`);
    micOff();
  } finally {
    buttons.mic.disabled = false;
    buttons.mic.textContent = mic ? 'Microphone: on' : 'Microphone: off';
    buttons.mic.setAttribute('aria-pressed', mic ? 'true' : 'false');
  }
});
