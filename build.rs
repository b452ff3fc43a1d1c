//! Generates the `tts` protobuf types (prost) and the `tts.TTSService` server trait (tonic).
//! `protox` parses the .proto in pure Rust, so a fresh machine needs only cargo (no system
//! `protoc`). The encoded descriptor set is written next to the generated code: the worker
//! serves it over gRPC server reflection.
use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tts.proto");
    let fds = protox::compile(["proto/tts.proto"], ["proto"])?;
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("tts_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // The orchestrator speaks through its own raw-h2 client (src/grpc): no tonic client.
        .build_client(false)
        .build_server(true)
        // PCM stays a slice of the received HTTP/2 buffer: no copy per frame.
        .bytes(".tts.AudioFrame.audio_data")
        .compile_fds(fds)?;
    Ok(())
}
