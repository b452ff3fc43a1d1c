//! gRPC over raw `h2` (no tonic): framing, status, server and client. (placeholder: being written)
