//! Generates the `tts` protobuf types with prost. `protox` parses the .proto in pure Rust, so
//! a fresh machine needs only cargo (no system `protoc`).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/tts.proto");
    let fds = protox::compile(["proto/tts.proto"], ["proto"])?;
    prost_build::Config::new()
        // PCM stays a slice of the received HTTP/2 buffer: no copy per frame.
        .bytes([".tts.AudioFrame.audio_data"])
        .compile_fds(fds)?;
    Ok(())
}
