//! The orchestrator drives our gRPC client from inside `tokio_uring` runtimes (one
//! single-threaded runtime with a `LocalSet` per core). This proves the client works there:
//! connect, concurrent Synthesize calls, a cancel, and a Control while audio streams, against
//! an in-process worker started with `duplex::worker::spawn`.

use std::collections::HashMap;
use std::time::Duration;

use duplex::grpc::{ClientOptions, TtsClient};
use duplex::proto::{ControlCommand, ControlRequest, StartSessionRequest, TextChunk};
use duplex::worker::{spawn, WorkerArgs};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(10);

#[test]
fn client_works_inside_a_tokio_uring_runtime() {
    let worker = spawn(WorkerArgs {
        listen: "127.0.0.1:0".into(),
        // 25 frames take ~1.25 s: call 0 is surely paused and cancelled mid-way.
        mock_frame_interval_ms: 50,
        ..WorkerArgs::default()
    })
    .unwrap();
    let addr = format!("grpc://{}", worker.local_addr());

    tokio_uring::start(async move {
        let client = timeout(WAIT, TtsClient::connect(&addr, &ClientOptions::default()))
            .await
            .unwrap()
            .unwrap();
        let mut calls = Vec::new();
        for i in 0..8 {
            let client = client.clone();
            // spawn_local: the orchestrator's per-core tasks are !Send.
            calls.push(tokio::task::spawn_local(async move {
                let id = format!("u{i}");
                let r = client
                    .start_session(
                        &StartSessionRequest {
                            session_id: id.clone(),
                            model_id: String::new(),
                            options: HashMap::new(),
                        },
                        Some(WAIT),
                    )
                    .await
                    .unwrap();
                assert!(r.success);
                let (mut tx, mut rx) = client.synthesize(Some(WAIT)).await.unwrap();
                tx.send(&TextChunk {
                    session_id: id.clone(),
                    text: "hello".into(),
                    is_final: true,
                    sequence_number: 1,
                })
                .unwrap();
                if i == 0 {
                    // Control while audio streams, then drop the call mid-way.
                    let f = timeout(WAIT, rx.message()).await.unwrap().unwrap().unwrap();
                    assert_eq!(f.sequence_number, 1);
                    let c = client
                        .control(
                            &ControlRequest {
                                session_id: id,
                                command: ControlCommand::Pause as i32,
                            },
                            Some(WAIT),
                        )
                        .await
                        .unwrap();
                    assert!(c.success);
                    return 0;
                }
                let mut n = 0;
                while let Some(f) = timeout(WAIT, rx.message()).await.unwrap().unwrap() {
                    n += 1;
                    assert_eq!(f.sequence_number, n);
                    assert_eq!(f.audio_data.len(), 1920);
                }
                n
            }));
        }
        for (i, call) in calls.into_iter().enumerate() {
            let frames = timeout(WAIT, call).await.unwrap().unwrap();
            assert_eq!(frames, if i == 0 { 0 } else { 25 });
        }
        // The cancelled call is gone on the worker.
        let t0 = std::time::Instant::now();
        loop {
            let caps = client.get_capabilities(Some(WAIT)).await.unwrap();
            if caps.metrics["active_syntheses"] == 0.0 {
                assert_eq!(caps.metrics["syntheses_aborted"], 1.0);
                break;
            }
            assert!(t0.elapsed() < WAIT, "cancelled synthesis still running");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!client.is_closed());
    });
    worker.shutdown();
}
