//! A client connection's byte stream: plain TCP, or TLS over it.
//!
//! The socket stays an io_uring `TcpStream` either way. With TLS, rustls sits between the
//! socket's owned buffers and the rest of the connection: ciphertext read from the socket is
//! fed to it and plaintext comes out; plaintext chunks go in and the records it produces are
//! written in one `write`. Plain TCP keeps the zero-copy vectored write of the queued chunks.
//!
//! Why every TLS socket write goes through one lock: the session's reader (which may have to
//! answer the handshake or a key update) and its writer both produce records, and two io_uring
//! writes in flight on one socket could interleave. The lock is per connection and never
//! contended on the frame path (the reader writes only during the handshake and on rare
//! key updates).

use std::cell::RefCell;
use std::io::{self, Read as _, Write as _};
use std::net::Shutdown;
use std::sync::Arc;

use bytes::Bytes;
use tokio_uring::net::TcpStream;

/// Most iovecs per `writev` (the kernel limit is 1024).
pub const MAX_IOV: usize = 512;

/// A connection's stream: see the module documentation.
pub struct Wire {
    tcp: TcpStream,
    tls: Option<TlsState>,
}

struct TlsState {
    conn: RefCell<rustls::ServerConnection>,
    /// Serialises socket writes (see the module documentation).
    writing: tokio::sync::Mutex<()>,
    /// The buffer records are encrypted into, kept between writes.
    spare: RefCell<Vec<u8>>,
}

impl Wire {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Self {
        Self { tcp, tls: None }
    }

    /// A TLS connection with `config`; the handshake runs as the first reads come in.
    pub fn tls(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let mut conn = rustls::ServerConnection::new(config).map_err(io::Error::other)?;
        // The session's output queue bounds what is written; rustls needn't bound it again.
        conn.set_buffer_limit(None);
        Ok(Self {
            tcp,
            tls: Some(TlsState {
                conn: RefCell::new(conn),
                writing: tokio::sync::Mutex::new(()),
                spare: RefCell::new(Vec::with_capacity(8192)),
            }),
        })
    }

    /// True for a TLS connection.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Sets TCP_NODELAY.
    pub fn set_nodelay(&self, on: bool) -> io::Result<()> {
        self.tcp.set_nodelay(on)
    }

    /// Shuts the socket down (completes reads and writes in flight).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    /// Reads plaintext into `buf`: `Ok(0)` at the end of the stream.
    pub async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let Some(tls) = &self.tls else {
            return self.tcp.read(buf).await;
        };
        loop {
            let res = tls.conn.borrow_mut().reader().read(&mut buf);
            match res {
                Ok(n) => return (Ok(n), buf),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // The peer closed TCP without a close_notify: an end, as for plain TCP.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return (Ok(0), buf),
                Err(e) => return (Err(e), buf),
            }
            // No plaintext buffered: read ciphertext into the same buffer and decrypt it.
            let (res, b) = self.tcp.read(buf).await;
            buf = b;
            let n = match res {
                Ok(0) => return (Ok(0), buf),
                Ok(n) => n,
                Err(e) => return (Err(e), buf),
            };
            let fed = feed(&mut tls.conn.borrow_mut(), &buf[..n]);
            // Handshake messages, alerts and key updates to send back.
            let flushed = self.flush(tls).await;
            if let Err(e) = fed.and(flushed) {
                return (Err(e), buf);
            }
        }
    }

    /// Writes all of `data`.
    pub async fn write_all(&self, data: Vec<u8>) -> io::Result<()> {
        match &self.tls {
            None => self.tcp.write_all(data).await.0,
            Some(tls) => {
                tls.conn.borrow_mut().writer().write_all(&data)?;
                self.flush(tls).await
            }
        }
    }

    /// Writes every chunk of `batch` (handling partial writes) and leaves it empty.
    pub async fn write_batch(&self, batch: &mut Vec<Bytes>) -> io::Result<()> {
        let Some(tls) = &self.tls else {
            return writev_all(&self.tcp, batch).await;
        };
        {
            let mut conn = tls.conn.borrow_mut();
            let mut writer = conn.writer();
            // One pass per up-to-MAX_IOV slices; rustls packs them into as few records as fit.
            let mut rest = &batch[..];
            while !rest.is_empty() {
                let slices: Vec<io::IoSlice<'_>> = rest
                    .iter()
                    .take(MAX_IOV)
                    .map(|c| io::IoSlice::new(c))
                    .collect();
                let mut n = writer.write_vectored(&slices)?;
                let mut whole = 0;
                for c in rest.iter().take(slices.len()) {
                    if n >= c.len() {
                        n -= c.len();
                        whole += 1;
                    } else {
                        // With no buffer limit rustls takes everything; a short write would
                        // be a bug, never silently drop bytes.
                        return Err(io::Error::other("TLS writer took part of a chunk"));
                    }
                }
                rest = &rest[whole..];
            }
        }
        batch.clear();
        self.flush(tls).await
    }

    /// Ends our side of the stream: TLS close_notify, then the TCP half-close.
    pub async fn close_write(&self) {
        if let Some(tls) = &self.tls {
            tls.conn.borrow_mut().send_close_notify();
            let _ = self.flush(tls).await;
        }
        let _ = self.tcp.shutdown(Shutdown::Write);
    }

    /// Writes every record rustls has ready.
    async fn flush(&self, tls: &TlsState) -> io::Result<()> {
        let _guard = tls.writing.lock().await;
        loop {
            let mut out = std::mem::take(&mut *tls.spare.borrow_mut());
            out.clear();
            {
                let mut conn = tls.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                *tls.spare.borrow_mut() = out;
                return Ok(());
            }
            let (res, out) = self.tcp.write_all(out).await;
            *tls.spare.borrow_mut() = out;
            res?;
        }
    }
}

/// Feeds ciphertext to rustls and processes it.
fn feed(conn: &mut rustls::ServerConnection, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        match conn.read_tls(&mut bytes) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(e),
        }
        conn.process_new_packets()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    }
    Ok(())
}

/// Writes every chunk of `batch` with vectored writes (handling partial writes) and leaves it
/// empty: the chunks go to the kernel as they are, no copy.
async fn writev_all(stream: &TcpStream, batch: &mut Vec<Bytes>) -> io::Result<()> {
    while !batch.is_empty() {
        let (res, b) = stream.writev(std::mem::take(batch)).await;
        *batch = b;
        let mut n = res?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut done = 0;
        for chunk in batch.iter_mut() {
            if n >= chunk.len() {
                n -= chunk.len();
                done += 1;
            } else {
                bytes::Buf::advance(chunk, n);
                break;
            }
        }
        batch.drain(..done);
    }
    Ok(())
}
