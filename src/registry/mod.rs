//! The Redis worker registry (docs/PROTOCOL.md §3): workers announce themselves, orchestrators find
//! them and pick one per session.
//!
//! - [`record`]: the JSON record under `worker:<name>`, written and parsed strictly.
//! - [`register`]: the worker side, a heartbeat task that keeps the record alive (`SETEX`).
//! - [`discovery`]: the orchestrator side, a thread that keeps an immutable snapshot of all
//!   records (`SCAN` + `MGET`) that request-path code reads without waiting on Redis.
//! - [`select`]: the pure routing decision for a new session (model, language, load).
//!
//! Redis is for discovery only and never on the per-frame path; both sides survive Redis
//! outages on their own (reconnect with [`backoff`]), so a Redis restart needs no restart of
//! anything else.

pub mod backoff;
pub mod discovery;
pub mod record;
pub mod register;
pub mod select;

use std::time::Duration;

pub use discovery::{start_discovery, start_discovery_with, Discovery, DiscoveryConfig, Snapshot};
pub use record::{parse, Capabilities, Metrics, WorkerRecord};
pub use register::{spawn_registration, Registration, RegistrationConfig};
pub use select::{choose, Candidate};

/// Key prefix of worker records (docs/PROTOCOL.md §3); a deployment may change it to share a Redis.
pub const DEFAULT_PREFIX: &str = "worker:";
/// Lifetime of a record without heartbeat (docs/PROTOCOL.md §3 default).
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);
/// How often discovery re-reads the registry when no keyspace notification arrives.
pub const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(1);
/// Bound on establishing a Redis connection; an unreachable Redis must not stall a heartbeat.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on one Redis command, so a hung Redis is detected and retried.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Why the registry could not be started or finished; runtime Redis failures are not errors
/// (they are retried and logged), only misconfiguration and the final delete are.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The Redis URL does not parse (`redis://[user:pass@]host[:port][/db]`).
    #[error("invalid Redis URL {url}: {reason}")]
    InvalidUrl {
        /// The URL with any password replaced by `***`.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// A configuration value is out of range (empty name, TTL under one second, ...).
    #[error("invalid registry configuration: {0}")]
    InvalidConfig(String),
    /// `spawn_registration` was called outside a tokio runtime.
    #[error("the worker registration must be started inside a tokio runtime")]
    NoRuntime,
    /// The discovery thread or its runtime could not be created.
    #[error("cannot start the discovery thread: {0}")]
    Thread(std::io::Error),
    /// A Redis operation that had to succeed did not (e.g. the delete on shutdown).
    #[error("redis: {0}")]
    Redis(String),
}

/// Opens a Redis client for `url`, with the password hidden from the error message.
fn open_client(url: &str) -> Result<redis::Client, RegistryError> {
    redis::Client::open(url).map_err(|e| RegistryError::InvalidUrl {
        url: redact_url(url),
        reason: e.to_string(),
    })
}

/// A multiplexed connection with bounded connect and per-command response times.
async fn connect(client: &redis::Client) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    let cfg = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
}

/// `url` with the userinfo's password replaced by `***`, safe for logs and errors.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                format!("{scheme}://***@{host}{tail}")
            }
        }
        None => url.to_string(),
    }
}

/// Escapes Redis glob metacharacters so a prefix matches literally in `SCAN MATCH` and
/// `PSUBSCRIBE`.
fn glob_escape(prefix: &str) -> String {
    let mut out = String::with_capacity(prefix.len() + 2);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("redis://127.0.0.1:6379/0"),
            "redis://127.0.0.1:6379/0"
        );
        assert_eq!(
            redact_url("redis://user:secret@host:6379/2"),
            "redis://user:***@host:6379/2"
        );
        assert_eq!(redact_url("redis://secret@host"), "redis://***@host");
        assert_eq!(redact_url("rediss://:p@w@h:1"), "rediss://:***@h:1");
    }

    #[test]
    fn bad_url_is_an_error_without_the_password() {
        let e = open_client("http://u:secret@host").unwrap_err().to_string();
        assert!(e.contains("invalid Redis URL"), "{e}");
        assert!(!e.contains("secret"), "{e}");
    }

    #[test]
    fn escapes_glob_characters() {
        assert_eq!(glob_escape("worker:"), "worker:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
