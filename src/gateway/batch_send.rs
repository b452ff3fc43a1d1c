//! One io_uring submission for every frame a pacer tick releases, across all of a core's
//! connections.
//!
//! Why not the connection's writer task: through tokio-uring every frame cost a task wake-up,
//! a `Notify`, an op allocated in the driver's slab, a `Vec<iovec>` built per `writev`, a second
//! wake-up when the op completed and a second poll to find the queue empty. At 1,000 sessions
//! that was a third of the orchestrator's user-space time per frame (README Performance). Here
//! the pacer tick pushes one `sendmsg` entry per connection with a frame due into a ring the
//! core owns, submits them all with one `io_uring_enter`, and reads the completions the kernel
//! posted during that same call (a loopback or LAN socket with room in its send buffer
//! completes inline). A send the kernel could not finish inline (the client's window is full)
//! completes later and is reaped by [`BatchSender::reap_later`]'s task.
//!
//! What stays with the writer task: TLS connections, everything queued outside a pacer tick
//! (events, JSON control frames, a first frame sent on arrival) and any remainder of a short
//! send. Only one of the two writes a connection at a time (see
//! [`crate::gateway::session::output::Output`]), so bytes never interleave.
//!
//! Memory: each send in flight owns its chunks (`Bytes`, so the PCM is not copied) and a boxed
//! `msghdr` + iovec array whose address the kernel may read until the send completes. Both
//! are recycled through a free list, so steady-state sending allocates nothing.

use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use bytes::Bytes;
use io_uring::{opcode, types, IoUring};
use tokio::io::unix::AsyncFd;

/// Most chunks one send carries (a binary frame is 2: header and PCM; a JSON frame 1).
pub const MAX_CHUNKS: usize = 8;

/// Submission queue entries of a core's ring: a tick with more sends than this submits in
/// several rounds.
const RING_ENTRIES: u32 = 1024;

/// The kernel-visible part of a send: stable in memory (boxed) until the send completes.
struct Header {
    msg: libc::msghdr,
    iov: [libc::iovec; MAX_CHUNKS],
}

/// One send in flight.
struct InFlight<T> {
    owner: T,
    chunks: Vec<Bytes>,
    header: Box<Header>,
}

/// A completed send, handed back to its owner.
pub struct Completion<T> {
    pub owner: T,
    /// The chunks the send carried, in order (the owner requeues what `result` says was not
    /// sent, then gives the vector back with [`BatchSender::recycle`]).
    pub chunks: Vec<Bytes>,
    /// Bytes sent, or the error.
    pub result: io::Result<usize>,
}

/// A refused send: why, and its chunks, unsent.
pub type Refused = (io::Error, Vec<Bytes>);

/// A core's batch sender (see the module documentation).
pub struct BatchSender<T> {
    /// The ring's file descriptor, readable when completions wait (for [`Self::reap_later`]).
    /// Declared before `ring` so it is deregistered before the ring's file closes.
    readable: AsyncFd<RawFd>,
    ring: RefCell<IoUring>,
    inflight: RefCell<slab::Slab<InFlight<T>>>,
    /// Recycled send headers (boxed: their address is what the kernel was given) and chunk
    /// vectors.
    #[allow(clippy::vec_box)]
    free_headers: RefCell<Vec<Box<Header>>>,
    free_chunks: RefCell<Vec<Vec<Bytes>>>,
}

impl<T> BatchSender<T> {
    /// A new ring; call on the core's thread inside its runtime.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(RING_ENTRIES)?;
        // SAFETY: the fd is the ring's, which this struct owns and closes only after the
        // AsyncFd (declared first) has been dropped.
        let readable = unsafe {
            AsyncFd::register_with_interest(ring.as_raw_fd(), tokio::io::Interest::READABLE)
        }?;
        Ok(Self {
            ring: RefCell::new(ring),
            readable,
            inflight: RefCell::new(slab::Slab::new()),
            free_headers: RefCell::new(Vec::new()),
            free_chunks: RefCell::new(Vec::new()),
        })
    }

    /// An empty chunk vector to fill for [`Self::push`] (recycled, no allocation once warm).
    pub fn chunk_vec(&self) -> Vec<Bytes> {
        self.free_chunks
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_CHUNKS))
    }

    /// Gives a chunk vector back (cleared here).
    pub fn recycle(&self, mut chunks: Vec<Bytes>) {
        chunks.clear();
        self.free_chunks.borrow_mut().push(chunks);
    }

    /// Sends in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight.borrow().len()
    }

    /// Queues a send of `chunks` (1..=[`MAX_CHUNKS`], in order) on `fd`; it goes to the kernel
    /// at the next [`Self::submit`]. `owner` comes back with the completion. On error the
    /// chunks come back, unsent.
    ///
    /// The caller keeps `fd` open until [`Self::submit`] has returned (the kernel holds its
    /// own reference to the socket from then on).
    pub fn push(&self, fd: RawFd, chunks: Vec<Bytes>, owner: T) -> Result<(), Refused> {
        if chunks.is_empty() || chunks.len() > MAX_CHUNKS {
            return Err((
                io::Error::other("a batched send carries 1 to 8 chunks"),
                chunks,
            ));
        }
        let mut header = self.free_headers.borrow_mut().pop().unwrap_or_else(|| {
            Box::new(Header {
                // SAFETY: msghdr and iovec are plain C structs for which all-zero is valid.
                msg: unsafe { std::mem::zeroed() },
                iov: [libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                }; MAX_CHUNKS],
            })
        });
        for (iov, c) in header.iov.iter_mut().zip(&chunks) {
            iov.iov_base = c.as_ptr() as *mut libc::c_void;
            iov.iov_len = c.len();
        }
        header.msg.msg_iov = header.iov.as_mut_ptr();
        header.msg.msg_iovlen = chunks.len() as _;
        let msg_ptr: *const libc::msghdr = &header.msg;
        let key = self.inflight.borrow_mut().insert(InFlight {
            owner,
            chunks,
            header,
        });
        // MSG_WAITALL: the kernel finishes a partial send itself (polling for room) instead
        // of completing it short; MSG_NOSIGNAL: a closed peer is an error, not a SIGPIPE.
        let entry = opcode::SendMsg::new(types::Fd(fd), msg_ptr)
            .flags((libc::MSG_WAITALL | libc::MSG_NOSIGNAL) as u32)
            .build()
            .user_data(key as u64);
        let mut tries = 0;
        loop {
            let mut ring = self.ring.borrow_mut();
            // SAFETY: the msghdr, its iovecs and the buffers they point to are owned by the
            // in-flight entry `key`, which is only dropped once the kernel posted this
            // entry's completion (or, at drop, leaked: see `Drop`).
            let pushed = unsafe { ring.submission().push(&entry) };
            drop(ring);
            if pushed.is_ok() {
                break;
            }
            // The submission queue is full: hand what it holds to the kernel and retry.
            tries += 1;
            let submitted = self.submit();
            if tries > 2 || submitted.is_err() {
                let f = self.inflight.borrow_mut().remove(key);
                self.free_headers.borrow_mut().push(f.header);
                let e = submitted
                    .err()
                    .unwrap_or_else(|| io::Error::other("io_uring submission queue full"));
                return Err((e, f.chunks));
            }
        }
        Ok(())
    }

    /// Hands every pushed send to the kernel in one `io_uring_enter`.
    pub fn submit(&self) -> io::Result<()> {
        if self.ring.borrow_mut().submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.borrow().submit() {
                Ok(_) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is full (the kernel can't post more): the caller
                // reaps and submits again at its next call.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Hands every completion the kernel has posted to `on_done`.
    pub fn reap(&self, mut on_done: impl FnMut(Completion<T>)) {
        loop {
            let next = self.ring.borrow_mut().completion().next();
            let Some(cqe) = next else {
                return;
            };
            let key = cqe.user_data() as usize;
            let Some(done) = self.inflight.borrow_mut().try_remove(key) else {
                continue;
            };
            self.free_headers.borrow_mut().push(done.header);
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else {
                Ok(res as usize)
            };
            on_done(Completion {
                owner: done.owner,
                chunks: done.chunks,
                result,
            });
        }
    }

    /// Waits until completions may be waiting (a send the kernel finished after the
    /// submitting call returned); the caller then calls [`Self::reap`].
    pub async fn reap_later(&self) -> io::Result<()> {
        let mut guard = self.readable.readable().await?;
        guard.clear_ready();
        Ok(())
    }
}

impl<T> Drop for BatchSender<T> {
    fn drop(&mut self) {
        // Sends still in flight may be read by the kernel after the ring's file is closed
        // (closing it cancels them asynchronously): leak their buffers rather than free
        // memory the kernel might still read. Only happens when a core shuts down.
        for (_, f) in std::mem::take(&mut *self.inflight.borrow_mut()) {
            std::mem::forget(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read as _;

    #[test]
    fn sends_every_chunk_in_order_on_each_socket_with_one_submit() {
        tokio_uring::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            let mut pairs = Vec::new();
            for _ in 0..3 {
                let client = std::net::TcpStream::connect(addr).unwrap();
                let (server, _) = listener.accept().unwrap();
                pairs.push((client, server));
            }
            let sender: BatchSender<usize> = BatchSender::new().unwrap();
            for (i, (_, server)) in pairs.iter().enumerate() {
                let mut v = sender.chunk_vec();
                v.push(Bytes::from(vec![b'h'; 3]));
                v.push(Bytes::from(vec![b'0' + i as u8; 1920]));
                sender.push(server.as_raw_fd(), v, i).unwrap();
            }
            assert_eq!(sender.in_flight(), 3);
            sender.submit().unwrap();
            let mut done = Vec::new();
            while done.len() < 3 {
                sender.reap(|c| done.push((c.owner, c.result.unwrap(), c.chunks.len())));
                if done.len() < 3 {
                    sender.reap_later().await.unwrap();
                }
            }
            done.sort();
            assert_eq!(done, vec![(0, 1923, 2), (1, 1923, 2), (2, 1923, 2)]);
            assert_eq!(sender.in_flight(), 0);
            for (i, (client, _)) in pairs.iter_mut().enumerate() {
                let mut got = vec![0u8; 1923];
                client.read_exact(&mut got).unwrap();
                assert_eq!(&got[..3], b"hhh");
                assert!(got[3..].iter().all(|&b| b == b'0' + i as u8));
            }
        });
    }

    #[test]
    fn a_send_to_a_closed_peer_completes_with_an_error_not_a_signal() {
        tokio_uring::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
            let (server, _) = listener.accept().unwrap();
            // A reset, so the send fails at once.
            let client = socket2::Socket::from(client);
            client.set_linger(Some(std::time::Duration::ZERO)).unwrap();
            drop(client);
            let sender: BatchSender<()> = BatchSender::new().unwrap();
            let mut result = None;
            for _ in 0..50 {
                let mut v = sender.chunk_vec();
                v.push(Bytes::from_static(b"frame"));
                sender.push(server.as_raw_fd(), v, ()).unwrap();
                sender.submit().unwrap();
                loop {
                    sender.reap(|c| result = Some(c.result.is_err()));
                    if sender.in_flight() == 0 {
                        break;
                    }
                    sender.reap_later().await.unwrap();
                }
                if result == Some(true) {
                    break;
                }
            }
            assert_eq!(result, Some(true), "sending to a reset peer must fail");
        });
    }

    #[test]
    fn a_send_to_a_peer_that_does_not_read_waits_and_a_shutdown_ends_it() {
        // What the session relies on when a client stops reading: the send stays in flight
        // (MSG_WAITALL: no short completion), and shutting the socket down completes it.
        tokio_uring::start(async {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let client =
                socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            client.set_recv_buffer_size(4096).unwrap();
            client
                .connect(&listener.local_addr().unwrap().into())
                .unwrap();
            let (server, _) = listener.accept().unwrap();
            socket2::SockRef::from(&server)
                .set_send_buffer_size(4096)
                .unwrap();
            let sender: BatchSender<()> = BatchSender::new().unwrap();
            let mut v = sender.chunk_vec();
            v.push(Bytes::from(vec![7u8; 8 << 20]));
            sender.push(server.as_raw_fd(), v, ()).unwrap();
            sender.submit().unwrap();
            let mut results = Vec::new();
            sender.reap(|c| results.push(c.result.map_err(|e| e.kind())));
            assert!(
                results.is_empty(),
                "8 MiB can't fit unread buffers: {results:?}"
            );
            assert_eq!(sender.in_flight(), 1);
            server.shutdown(std::net::Shutdown::Both).unwrap();
            while sender.in_flight() > 0 {
                sender.reap_later().await.unwrap();
                sender.reap(|c| results.push(c.result.map_err(|e| e.kind())));
            }
            assert_eq!(results.len(), 1);
            if let Ok(n) = &results[0] {
                assert!(*n < 8 << 20, "a cut send reports what it sent: {n}");
            }
            drop(client);
        });
    }

    #[test]
    fn a_send_with_no_chunks_or_too_many_is_refused() {
        tokio_uring::start(async {
            let sender: BatchSender<()> = BatchSender::new().unwrap();
            assert!(sender.push(0, Vec::new(), ()).is_err());
            let many = vec![Bytes::from_static(b"x"); MAX_CHUNKS + 1];
            assert!(sender.push(0, many, ()).is_err());
            assert_eq!(sender.in_flight(), 0);
        });
    }
}
