//! A session's binding to its TTS worker: which worker, whether the worker session is open,
//! and the current utterance's gRPC stream.
//!
//! The async half (`Session::synthesize`) drives the gRPC calls; the state
//! here is what they share with the session's event handlers, kept in its own `RefCell` so no
//! borrow of it is ever held across an await or a call into playback.

use tokio::task::JoinHandle;

use crate::grpc::RequestSink;
use crate::proto;

/// The worker stream of one utterance.
struct Stream {
    generation: u64,
    /// Request half of the worker stream, once open.
    sink: Option<RequestSink<proto::TextChunk>>,
    /// Chunks received before the stream opened, with their `is_final` flags.
    unsent: Vec<(String, bool)>,
    /// `sequence_number` of the last chunk sent.
    chunk_seq: i64,
    /// Chunks already sent on `sink`, kept until the first frame arrives: while the client
    /// has heard nothing, a worker that refuses the stream (draining) or dies can be replaced
    /// by another that gets the whole text again (see [`Link::rewind`]).
    replay: Option<Vec<(String, bool)>>,
    /// The synthesis task reading the stream.
    task: Option<JoinHandle<()>>,
}

/// The session's worker binding.
#[derive(Default)]
pub struct Link {
    /// Worker chosen for this session (an index into the core's upstream).
    pub worker: Option<usize>,
    /// StartSession succeeded on `worker`.
    pub opened: bool,
    /// The connection it succeeded on: the worker ties its sessions to their connection, so
    /// after a reconnect the session must be opened again.
    opened_on: Option<crate::grpc::TtsClient>,
    stream: Option<Stream>,
    /// Tasks to abort when the session ends.
    pub tasks: Vec<JoinHandle<()>>,
}

impl Link {
    /// The worker session is open on `client`'s connection.
    pub fn opened_on(&mut self, client: &crate::grpc::TtsClient) {
        self.opened = true;
        self.opened_on = Some(client.clone());
    }

    /// True when the worker session is open on `client`'s connection.
    pub fn is_open_on(&self, client: &crate::grpc::TtsClient) -> bool {
        self.opened
            && self
                .opened_on
                .as_ref()
                .is_some_and(|c| c.client().same_connection(client.client()))
    }

    /// Begins utterance `generation`: its chunks wait until the stream opens.
    pub fn begin(&mut self, generation: u64, chunks: Vec<(String, bool)>, task: JoinHandle<()>) {
        self.cancel();
        self.stream = Some(Stream {
            generation,
            sink: None,
            unsent: chunks,
            chunk_seq: 0,
            replay: Some(Vec::new()),
            task: Some(task),
        });
    }

    /// Forwards a text chunk of utterance `generation` to the worker, or keeps it until the
    /// stream is open.
    pub fn push_text(&mut self, generation: u64, session_id: &str, text: String, is_final: bool) {
        let Some(s) = self.stream.as_mut().filter(|s| s.generation == generation) else {
            return;
        };
        match s.sink.as_mut() {
            Some(sink) => {
                if let Some(r) = s.replay.as_mut() {
                    r.push((text.clone(), is_final));
                }
                send_chunk(sink, &mut s.chunk_seq, session_id, text, is_final)
            }
            None => s.unsent.push((text, is_final)),
        }
    }

    /// The worker stream of `generation` opened: send what waited. False when the utterance
    /// is no longer current (the caller drops the sink, which resets the stream).
    pub fn attach(
        &mut self,
        generation: u64,
        session_id: &str,
        mut sink: RequestSink<proto::TextChunk>,
    ) -> bool {
        let Some(s) = self.stream.as_mut().filter(|s| s.generation == generation) else {
            return false;
        };
        for (text, is_final) in std::mem::take(&mut s.unsent) {
            if let Some(r) = s.replay.as_mut() {
                r.push((text.clone(), is_final));
            }
            send_chunk(&mut sink, &mut s.chunk_seq, session_id, text, is_final);
        }
        s.sink = Some(sink);
        true
    }

    /// The first frame of `generation` arrived: from now on the utterance belongs to this
    /// worker (the client has heard part of it), so its text need not be kept for a retry.
    pub fn first_frame(&mut self, generation: u64) {
        if let Some(s) = self.stream.as_mut().filter(|s| s.generation == generation) {
            s.replay = None;
        }
    }

    /// Takes utterance `generation` back from a worker that produced no audio for it: the
    /// stream is dropped (reset on the wire) and every chunk sent on it waits again for the
    /// next stream, in order, ahead of chunks that never left. False when the utterance is
    /// no longer current or audio already arrived (then it cannot be replayed).
    pub fn rewind(&mut self, generation: u64) -> bool {
        let Some(s) = self.stream.as_mut().filter(|s| s.generation == generation) else {
            return false;
        };
        let Some(mut chunks) = s.replay.replace(Vec::new()) else {
            return false;
        };
        s.sink = None;
        s.chunk_seq = 0;
        chunks.append(&mut s.unsent);
        s.unsent = chunks;
        true
    }

    /// The synthesis task of `generation` is finishing by itself (don't abort it).
    pub fn finished(&mut self, generation: u64) {
        if let Some(s) = self.stream.as_mut().filter(|s| s.generation == generation) {
            s.task = None;
        }
    }

    /// Cancels the current worker stream: aborting its task drops the stream, which resets it
    /// on the wire, and the worker stops generating.
    pub fn cancel(&mut self) {
        if let Some(mut s) = self.stream.take() {
            if let Some(task) = s.task.take() {
                task.abort();
            }
        }
    }

    /// After a worker failure the next utterance chooses again and re-opens the session;
    /// returns the worker to release.
    pub fn forget(&mut self) -> Option<usize> {
        self.opened = false;
        self.opened_on = None;
        self.worker.take()
    }
}

fn send_chunk(
    sink: &mut RequestSink<proto::TextChunk>,
    seq: &mut i64,
    session_id: &str,
    text: String,
    is_final: bool,
) {
    *seq += 1;
    let chunk = proto::TextChunk {
        session_id: session_id.to_string(),
        text,
        is_final,
        sequence_number: *seq,
    };
    // A send error means the stream is gone; the synthesis task reports it.
    let _ = sink.send(&chunk);
    if is_final {
        let _ = sink.finish();
    }
}
