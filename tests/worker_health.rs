//! `grpc.health.v1` and server reflection on the real `duplex worker` binary, through clients
//! that are not ours: tonic-health / tonic-reflection's generated clients, and Python grpcio
//! (`grpcio-health-checking`, `grpcio-reflection`) as used by the Python system's tooling and
//! by `grpc_health_probe`-style checks.
//!
//! The Python test creates a venv under `target/grpc-venv` on first use and installs the three
//! packages from PyPI. Without python3, venv or pip it fails with that reason: it never skips.

mod common;

use common::spawn::Spawned as Worker;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::timeout;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const WAIT: Duration = Duration::from_secs(10);

async fn channel(addr: &str) -> Channel {
    timeout(
        WAIT,
        Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .await
    .expect("connect timed out")
    .expect("connect")
}

/// The service names reflection lists, or its error status.
async fn list_services(addr: &str, token: Option<&str>) -> Result<Vec<String>, tonic::Status> {
    let mut client = ServerReflectionClient::new(channel(addr).await);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    }]));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut responses = timeout(WAIT, client.server_reflection_info(request))
        .await
        .expect("reflection timed out")?
        .into_inner();
    let response = timeout(WAIT, responses.message())
        .await
        .expect("reflection timed out")?
        .expect("a reflection response");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            Ok(list.service.into_iter().map(|s| s.name).collect())
        }
        other => panic!("unexpected reflection response {other:?}"),
    }
}

#[tokio::test]
async fn tonic_health_and_reflection_clients() {
    let w = Worker::worker(&[]);
    let mut health = HealthClient::new(channel(&w.addr).await);
    for service in ["", "tts.TTSService"] {
        let status = timeout(
            WAIT,
            health.check(HealthCheckRequest {
                service: service.into(),
            }),
        )
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = timeout(
        WAIT,
        health.check(HealthCheckRequest {
            service: "no.Such".into(),
        }),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let services = list_services(&w.addr, None).await.unwrap();
    for want in [
        "tts.TTSService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(services.iter().any(|s| s == want), "{want} in {services:?}");
    }
}

#[tokio::test]
async fn reflection_needs_the_worker_token_and_health_does_not() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("worker-health-token");
    std::fs::write(&path, "probe-token\n").unwrap();
    let w = Worker::worker(&["--worker-token-file", &path.to_string_lossy()]);
    let e = list_services(&w.addr, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = list_services(&w.addr, Some("wrong")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let services = list_services(&w.addr, Some("probe-token")).await.unwrap();
    assert!(
        services.iter().any(|s| s == "tts.TTSService"),
        "{services:?}"
    );
    let mut health = HealthClient::new(channel(&w.addr).await);
    let status = timeout(WAIT, health.check(HealthCheckRequest::default()))
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}

/// `target/grpc-venv`'s python with grpcio, grpcio-health-checking and grpcio-reflection,
/// created and installed on first use. Panics with the reason when that is impossible.
///
/// Once per test process: two tests of this file run at once, and two `python3 -m venv` of
/// the same directory on a fresh machine fail each other ("File exists: 'lib'").
fn grpc_python() -> PathBuf {
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON.get_or_init(create_grpc_python).clone()
}

fn create_grpc_python() -> PathBuf {
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("target dir")
        .to_path_buf();
    let venv = target.join("grpc-venv");
    let python = venv.join("bin").join("python");
    let has_packages = |python: &Path| {
        Command::new(python)
            .args(["-c", "import grpc, grpc_health.v1, grpc_reflection.v1alpha"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if python.exists() && has_packages(&python) {
        return python;
    }
    if !python.exists() {
        let out = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .output()
            .unwrap_or_else(|e| {
                panic!("python3 is needed for the grpcio interop test and cannot run: {e}")
            });
        assert!(
            out.status.success(),
            "cannot create the venv {} (python3 -m venv; on Debian: apt-get install \
             python3-venv): {}",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "grpcio",
            "grpcio-health-checking",
            "grpcio-reflection",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run pip in {}: {e}", venv.display()));
    assert!(
        out.status.success(),
        "pip install grpcio grpcio-health-checking grpcio-reflection failed (PyPI \
         unreachable?); this test needs them:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        has_packages(&python),
        "grpcio packages installed but not importable"
    );
    python
}

/// Checks health (no metadata, as probes do) and lists services by reflection v1alpha (the
/// version grpcio-reflection's client speaks), with the token when one is given.
const PY_CHECK: &str = r#"
import sys
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

addr, token = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
channel = grpc.insecure_channel(addr)
grpc.channel_ready_future(channel).result(timeout=20)
health = health_pb2_grpc.HealthStub(channel)
for service in ("", "tts.TTSService"):
    r = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=20)
    assert r.status == health_pb2.HealthCheckResponse.SERVING, (service, r)
metadata = [("authorization", "Bearer " + token)] if token else None
stub = reflection_pb2_grpc.ServerReflectionStub(channel)
request = reflection_pb2.ServerReflectionRequest(list_services="")
names = []
for response in stub.ServerReflectionInfo(iter([request]), timeout=20, metadata=metadata):
    names.extend(s.name for s in response.list_services_response.service)
print("services:", names)
assert "tts.TTSService" in names, names
assert "grpc.health.v1.Health" in names, names
if token:
    try:
        list(stub.ServerReflectionInfo(iter([request]), timeout=20))
        raise SystemExit("reflection without the token was not refused")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e
print("ok")
"#;

fn run_python_check(python: &Path, addr: &str, token: Option<&str>) {
    let out = Command::new(python)
        .args(["-c", PY_CHECK, addr])
        .args(token)
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ok"),
        "grpcio check against {addr} failed:\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn python_grpcio_health_check_and_reflection() {
    let python = grpc_python();
    let w = Worker::worker(&[]);
    run_python_check(&python, &w.addr, None);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("worker-health-py-token");
    std::fs::write(&path, "py-token").unwrap();
    let w = Worker::worker(&["--worker-token-file", &path.to_string_lossy()]);
    run_python_check(&python, &w.addr, Some("py-token"));
}

/// A grpcio server (gRPC's C core, what the Python workers run on) whose streaming call stays
/// quiet for a while before answering, as a slow model does before its first frame.
const PY_QUIET_SERVER: &str = r#"
import sys, time
from concurrent import futures
import grpc

quiet = float(sys.argv[1])

def wait(request, context):
    time.sleep(quiet)
    yield b""

handler = grpc.method_handlers_generic_handler(
    "t.Quiet", {"Wait": grpc.unary_stream_rpc_method_handler(wait)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

/// Our client PINGs a call that has gone quiet to notice a frozen worker, but gRPC's C core
/// closes a connection (GOAWAY `too_many_pings`) that receives more than two PINGs while it
/// sends nothing. A Python worker computing a 4 s first frame must keep its call: one PING
/// per quiet stretch, not one per 250 ms tick.
#[tokio::test]
async fn a_quiet_call_on_a_grpcio_server_survives_our_liveness_pings() {
    use std::io::BufRead;
    let python = grpc_python();
    let mut child = Command::new(&python)
        .args(["-c", PY_QUIET_SERVER, "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the grpcio server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the port");
    let port: u16 = line.trim().parse().expect("the server prints its port");
    let result = async {
        let client = duplex::grpc::Client::connect(
            &format!("127.0.0.1:{port}"),
            &duplex::grpc::ClientOptions::default(),
        )
        .await?;
        let (mut sink, mut stream) = client
            .streaming::<(), ()>("/t.Quiet/Wait", Some(Duration::from_secs(30)))
            .await?;
        sink.send(&())?;
        sink.finish()?;
        let first = stream.message().await?;
        let end = stream.message().await?;
        Ok::<_, duplex::grpc::Status>((first, end, client.is_closed()))
    };
    let outcome = timeout(Duration::from_secs(30), result).await;
    let _ = child.kill();
    let _ = child.wait();
    let (first, end, closed) = outcome
        .expect("the call must end within its 30 s deadline")
        .unwrap_or_else(|s| panic!("the quiet call failed: {s:?}"));
    assert_eq!(
        first,
        Some(()),
        "the server's message after its quiet stretch"
    );
    assert_eq!(end, None, "then the call ends with OK");
    assert!(!closed, "the connection is still usable");
}
