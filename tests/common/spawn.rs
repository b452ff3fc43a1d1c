//! A `duplex` subcommand as a child process for synchronous tests (the gRPC-level worker and
//! speech tests): started on a free port (retried if the port races away), waited for until it
//! accepts, and killed when dropped (after SIGCONT, in case a test stopped it).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use duplex::grpc::{ClientOptions, TtsClient};
use duplex::proto::{ControlCommand, ControlRequest};

/// Upper bound for the process to start listening.
const START: Duration = Duration::from_secs(10);

/// A running `duplex SUBCOMMAND --listen ADDR ...`.
pub struct Spawned {
    pub child: Child,
    pub addr: String,
}

impl Spawned {
    /// Starts `duplex SUBCOMMAND --listen ADDR EXTRA...` and waits until it accepts.
    pub fn start(subcommand: &str, extra: &[&str]) -> Spawned {
        for _ in 0..5 {
            let addr = format!("127.0.0.1:{}", super::free_port());
            let mut child = Command::new(env!("CARGO_BIN_EXE_duplex"))
                .args([subcommand, "--listen", &addr])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn duplex");
            let t0 = Instant::now();
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port raced away: try another
                }
                if std::net::TcpStream::connect(&addr).is_ok() {
                    return Spawned { child, addr };
                }
                assert!(
                    t0.elapsed() < START,
                    "duplex {subcommand} did not start listening"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("could not start duplex {subcommand}");
    }

    /// `duplex worker --listen ADDR EXTRA...`.
    pub fn worker(extra: &[&str]) -> Spawned {
        Self::start("worker", extra)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A gRPC client of this worker.
    pub async fn client(&self) -> TtsClient {
        TtsClient::connect(&format!("grpc://{}", self.addr), &ClientOptions::default())
            .await
            .expect("connect to the worker")
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.pid(), libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends a playback command for `session` and checks the worker accepted it.
pub async fn control(client: &TtsClient, session: &str, command: ControlCommand) {
    let r = client
        .control(
            &ControlRequest {
                session_id: session.into(),
                command: command as i32,
            },
            Some(START),
        )
        .await
        .expect("Control");
    assert!(r.success, "{}", r.message);
}
