//! The client's wire-level receive (what the bench's hot loop calls) allocates nothing per
//! audio frame, in either format: JSON audio is parsed in place (base64 not decoded), binary
//! audio is a slice of the message. Measured with a counting global allocator on the
//! receiving thread (the fake server runs on another thread and is not counted).

use std::io::Write as _;
use std::time::Duration;

use base64::Engine as _;
use duplex::client::{Client, Kind, Options};

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
use counting_alloc::allocs;

const FRAMES: u32 = 400;

/// Unmasked server frame with a 16-bit length.
fn frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x80 | opcode];
    if payload.len() < 126 {
        f.push(payload.len() as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(payload);
    f
}

/// A server that greets, then sends `FRAMES` audio frames (JSON or binary) in bursts.
fn serve(binary: bool) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut ws = tungstenite::accept(s).unwrap();
        let start = br#"{"type":"session_start","session_id":"ws-abcdefabcdef"}"#;
        let mut raw = frame(1, start);
        let pcm = vec![3u8; 1920];
        let b64 = base64::engine::general_purpose::STANDARD.encode(&pcm);
        for seq in 1..=FRAMES {
            if binary {
                let mut m = vec![1u8, 0, 0, 0];
                m.extend_from_slice(&seq.to_le_bytes());
                m.extend_from_slice(&pcm);
                raw.extend(frame(2, &m));
            } else {
                let m = format!(
                    r#"{{"type":"audio","pcm":"{b64}","sample_rate":48000,"frame_ms":20,"sequence":{seq}}}"#
                );
                raw.extend(frame(1, m.as_bytes()));
            }
            if seq % 20 == 0 {
                ws.get_mut().write_all(&raw).unwrap();
                raw.clear();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        ws.get_mut().write_all(&raw).unwrap();
        // Stay open until the client has read everything.
        let _ = ws.read();
    });
    (addr, t)
}

fn allocations_per_frame(binary: bool) -> f64 {
    let (addr, server) = serve(binary);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let per_frame = rt.block_on(async {
        let mut c = Client::connect(&format!("ws://{addr}/"), &Options::default())
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut sum = 0usize;
        let mut measured_from = None;
        for i in 1..=FRAMES {
            // Warm-up: the first frames size the buffers.
            if i == 21 {
                measured_from = Some(allocs());
            }
            let r = c.recv_wire(deadline).await.unwrap().expect("a frame");
            let Kind::Audio(a) = r.kind else {
                panic!("not audio: {:?}", r.kind)
            };
            assert_eq!(a.sequence, i);
            sum += a.pcm_len().unwrap_or(0);
        }
        let n = allocs() - measured_from.unwrap_or(0);
        assert_eq!(sum, FRAMES as usize * 1920);
        c.close().await;
        n as f64 / f64::from(FRAMES - 20)
    });
    server.join().unwrap();
    per_frame
}

#[test]
fn json_audio_is_received_without_allocating_per_frame() {
    let n = allocations_per_frame(false);
    assert!(n < 0.1, "{n:.3} allocations per JSON frame");
}

#[test]
fn binary_audio_is_received_without_allocating_per_frame() {
    let n = allocations_per_frame(true);
    assert!(n < 0.1, "{n:.3} allocations per binary frame");
}
