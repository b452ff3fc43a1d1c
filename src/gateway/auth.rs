//! Who may open a session: client credentials and the browser Origin policy, checked on the
//! request head before the WebSocket upgrade (docs/PROTOCOL.md §5).
//!
//! A refused request gets an HTTP status (401 for the credential, 403 for the Origin) and
//! nothing else: no session, no worker call. The credential is never logged. Static tokens and
//! keys are read from files (never flags, which `ps` shows) and re-read on SIGHUP; sessions
//! already open are not touched by a reload.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::ws::handshake::Request;

/// Clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 5;

/// Authentication flags of `duplex serve` / `duplex demo`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AuthArgs {
    /// File of static bearer tokens, one per line (`#` starts a comment); re-read on SIGHUP.
    #[arg(long, env = "DUPLEX_AUTH_TOKENS_FILE")]
    pub auth_tokens_file: Option<PathBuf>,
    /// File holding the HS256 secret clients' JWTs are signed with; re-read on SIGHUP.
    #[arg(long, env = "DUPLEX_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,
    /// PEM public key (RSA for RS256, EC P-256 for ES256) clients' JWTs are signed with.
    #[arg(long, env = "DUPLEX_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// Required `aud` claim of client JWTs.
    #[arg(long, env = "DUPLEX_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Required `iss` claim of client JWTs.
    #[arg(long, env = "DUPLEX_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Browser origins allowed to open sessions besides the page's own host (repeat; `*`
    /// allows any, only when written). Requests without `Origin` (not browsers) always pass.
    #[arg(
        long = "allowed-origin",
        env = "DUPLEX_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
}

impl AuthArgs {
    /// True when some credential is required.
    pub fn enabled(&self) -> bool {
        self.auth_tokens_file.is_some()
            || self.jwt_secret_file.is_some()
            || self.jwt_public_key_file.is_some()
    }
}

/// What a credential allows (narrowed by JWT claims; static tokens allow everything).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The `sub` of a JWT, for the log (never the token itself).
    pub subject: Option<String>,
    /// Models the session may use (`None` = any).
    pub models: Option<Vec<String>>,
    /// Upper bound on the session's length.
    pub max_session: Option<Duration>,
}

/// Why a request was refused (the `reason` label of `auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Invalid,
    Expired,
    Origin,
    Model,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Invalid => "invalid",
            Refusal::Expired => "expired",
            Refusal::Origin => "origin",
            Refusal::Model => "model",
        }
    }

    /// HTTP status and body for the client: what happened, nothing about why in detail.
    pub fn response(self) -> (u16, &'static str) {
        match self {
            Refusal::Missing => (
                401,
                "credential required (Authorization: Bearer or ?token=)\n",
            ),
            Refusal::Invalid => (401, "credential refused\n"),
            Refusal::Expired => (401, "credential expired\n"),
            Refusal::Origin => (403, "origin not allowed\n"),
            Refusal::Model => (403, "model not allowed for this credential\n"),
        }
    }
}

/// JWT claims we read.
#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// One model id or a list of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelClaim>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_secs: Option<f64>,
}

/// The `model` claim: one id or several.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelClaim {
    One(String),
    Many(Vec<String>),
}

/// Keys and tokens as loaded from the files.
struct Keys {
    tokens: HashSet<Vec<u8>>,
    jwt: Option<(DecodingKey, Validation)>,
}

/// The credential and Origin checks, shared by every core (read at each upgrade, written
/// only by a SIGHUP reload).
pub struct Auth {
    args: AuthArgs,
    keys: RwLock<Arc<Keys>>,
}

impl Auth {
    /// Loads the files named by `args`; a missing or unreadable file is a start-up error.
    pub fn new(args: AuthArgs) -> anyhow::Result<Self> {
        let keys = load(&args)?;
        Ok(Self {
            args,
            keys: RwLock::new(Arc::new(keys)),
        })
    }

    /// Re-reads the token and key files; on error the old ones stay in force.
    pub fn reload(&self) -> anyhow::Result<()> {
        let keys = load(&self.args)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// True when a credential is required.
    pub fn enabled(&self) -> bool {
        self.args.enabled()
    }

    /// Checks the Origin and the credential of an upgrade request.
    pub fn check(&self, req: &Request) -> Result<Grant, Refusal> {
        self.check_origin(req)?;
        if !self.enabled() {
            return Ok(Grant::default());
        }
        let token = credential(req).ok_or(Refusal::Missing)?;
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        let presented = token.as_bytes();
        // Constant-time per candidate, so a timing probe can't find a token byte by byte.
        if keys
            .tokens
            .iter()
            .any(|t| t.len() == presented.len() && bool::from(t.as_slice().ct_eq(presented)))
        {
            return Ok(Grant::default());
        }
        let Some((key, validation)) = &keys.jwt else {
            return Err(Refusal::Invalid);
        };
        let data =
            jsonwebtoken::decode::<Claims>(token, key, validation).map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature
                | jsonwebtoken::errors::ErrorKind::ImmatureSignature => Refusal::Expired,
                _ => Refusal::Invalid,
            })?;
        let c = data.claims;
        Ok(Grant {
            subject: c.sub,
            models: c.model.map(|m| match m {
                ModelClaim::One(m) => vec![m],
                ModelClaim::Many(v) => v,
            }),
            max_session: c
                .max_session_secs
                .filter(|s| s.is_finite() && *s > 0.0)
                .map(Duration::from_secs_f64),
        })
    }

    /// A browser's `Origin` must be the host it came to or an allowed origin; requests
    /// without one are not from a browser page and pass.
    fn check_origin(&self, req: &Request) -> Result<(), Refusal> {
        let Some(origin) = req.origin.as_deref() else {
            return Ok(());
        };
        let allowed = &self.args.allowed_origins;
        if allowed
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
        {
            return Ok(());
        }
        let same_host = req.host.as_deref().is_some_and(|host| {
            origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && rest.eq_ignore_ascii_case(host)
            })
        });
        if same_host {
            Ok(())
        } else {
            Err(Refusal::Origin)
        }
    }
}

/// The bearer token of a request: `Authorization: Bearer …`, else `?token=`.
fn credential(req: &Request) -> Option<&str> {
    if let Some(h) = req.authorization.as_deref() {
        let (scheme, value) = h.split_once(' ')?;
        if scheme.eq_ignore_ascii_case("bearer") && !value.trim().is_empty() {
            return Some(value.trim());
        }
        return None;
    }
    req.query
        .get("token")
        .map(String::as_str)
        .filter(|t| !t.is_empty())
}

fn load(args: &AuthArgs) -> anyhow::Result<Keys> {
    let mut tokens = HashSet::new();
    if let Some(path) = &args.auth_tokens_file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read --auth-tokens-file {}", path.display()))?;
        for line in text.lines() {
            let t = line.split('#').next().unwrap_or("").trim();
            if !t.is_empty() {
                tokens.insert(t.as_bytes().to_vec());
            }
        }
        if tokens.is_empty() {
            bail!("--auth-tokens-file {} holds no token", path.display());
        }
    }
    let jwt = match (&args.jwt_secret_file, &args.jwt_public_key_file) {
        (Some(_), Some(_)) => {
            bail!("give --jwt-secret-file or --jwt-public-key-file, not both")
        }
        (Some(path), None) => {
            let secret = read_secret(path, "--jwt-secret-file")?;
            Some((
                DecodingKey::from_secret(&secret),
                validation(args, &[Algorithm::HS256]),
            ))
        }
        (None, Some(path)) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read --jwt-public-key-file {}", path.display()))?;
            let (key, alg) = match DecodingKey::from_rsa_pem(&pem) {
                Ok(k) => (k, Algorithm::RS256),
                Err(_) => (
                    DecodingKey::from_ec_pem(&pem).with_context(|| {
                        format!(
                            "{} is neither an RSA nor an EC public key (PEM)",
                            path.display()
                        )
                    })?,
                    Algorithm::ES256,
                ),
            };
            Some((key, validation(args, &[alg])))
        }
        (None, None) => None,
    };
    Ok(Keys { tokens, jwt })
}

/// Validation with the algorithm pinned (a token's own `alg` can't choose, and `none` is never
/// accepted), `exp` required, `nbf` checked, and the optional audience and issuer.
fn validation(args: &AuthArgs, algs: &[Algorithm]) -> Validation {
    let mut v = Validation::new(algs[0]);
    v.algorithms = algs.to_vec();
    v.leeway = LEEWAY_SECS;
    v.validate_exp = true;
    v.validate_nbf = true;
    v.set_required_spec_claims(&["exp"]);
    match &args.jwt_audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    if let Some(iss) = &args.jwt_issuer {
        v.set_issuer(&[iss]);
    }
    v
}

/// A secret file's bytes without the trailing newline editors add.
pub fn read_secret(path: &std::path::Path, flag: &str) -> anyhow::Result<Vec<u8>> {
    let mut secret =
        std::fs::read(path).with_context(|| format!("cannot read {flag} {}", path.display()))?;
    while secret.last().is_some_and(|b| b.is_ascii_whitespace()) {
        secret.pop();
    }
    if secret.is_empty() {
        bail!("{flag} {} is empty", path.display());
    }
    Ok(secret)
}

/// Flags of `duplex token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// The HS256 secret (the file the gateway's `--jwt-secret-file` names).
    #[arg(long)]
    pub secret_file: PathBuf,
    /// Subject (who the token is for; appears in the gateway's log).
    #[arg(long, default_value = "duplex-user")]
    pub sub: String,
    /// Lifetime, e.g. `30m`, `1h`, `7d`, `90s`.
    #[arg(long, default_value = "1h", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Restrict the token to these models (repeat or comma-separate).
    #[arg(long, value_delimiter = ',')]
    pub model: Vec<String>,
    /// Cap the length of sessions opened with this token, in seconds.
    #[arg(long)]
    pub max_session_secs: Option<f64>,
}

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 90s, 30m, 1h or 7d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("'{s}': unit must be s, m, h or d")),
    };
    if secs == 0 {
        return Err("the lifetime must be positive".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Mints an HS256 token (`duplex token`), for trying authentication out.
pub fn mint(args: &TokenArgs) -> anyhow::Result<String> {
    let secret = read_secret(&args.secret_file, "--secret-file")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        sub: Some(args.sub.clone()),
        exp: now + args.ttl.as_secs(),
        nbf: Some(now),
        iat: Some(now),
        model: match args.model.len() {
            0 => None,
            1 => Some(ModelClaim::One(args.model[0].clone())),
            _ => Some(ModelClaim::Many(args.model.clone())),
        },
        max_session_secs: args.max_session_secs,
    };
    Ok(jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&secret),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>, token: Option<&str>, origin: Option<&str>) -> Request {
        let mut r = Request {
            method: "GET".into(),
            path: "/".into(),
            host: Some("gw.example:8080".into()),
            origin: origin.map(str::to_string),
            authorization: auth.map(str::to_string),
            ..Request::default()
        };
        if let Some(t) = token {
            r.query.insert("token".into(), t.into());
        }
        r
    }

    fn write(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("duplex-auth-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn static_tokens_header_or_query_and_reload() {
        let dir = tmpdir("static");
        let file = write(
            &dir,
            "tokens",
            "# team\nalpha\n  beta  # trailing comment\n\n",
        );
        let auth = Auth::new(AuthArgs {
            auth_tokens_file: Some(file.clone()),
            ..AuthArgs::default()
        })
        .unwrap();
        assert!(auth.check(&req(Some("Bearer alpha"), None, None)).is_ok());
        assert!(auth.check(&req(None, Some("beta"), None)).is_ok());
        assert_eq!(auth.check(&req(None, None, None)), Err(Refusal::Missing));
        assert_eq!(
            auth.check(&req(Some("Bearer gamma"), None, None)),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            auth.check(&req(Some("Basic alpha"), None, None)),
            Err(Refusal::Missing)
        );
        std::fs::write(&file, "gamma\n").unwrap();
        auth.reload().unwrap();
        assert!(auth.check(&req(Some("Bearer gamma"), None, None)).is_ok());
        assert_eq!(
            auth.check(&req(Some("Bearer alpha"), None, None)),
            Err(Refusal::Invalid)
        );
        // A broken file keeps the old tokens.
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(auth.reload().is_err());
        assert!(auth.check(&req(Some("Bearer gamma"), None, None)).is_ok());
    }

    #[test]
    fn jwt_checks_signature_expiry_algorithm_and_claims() {
        let dir = tmpdir("jwt");
        let secret = write(&dir, "secret", "s3cret-s3cret-s3cret\n");
        let auth = Auth::new(AuthArgs {
            jwt_secret_file: Some(secret.clone()),
            ..AuthArgs::default()
        })
        .unwrap();
        let good = mint(&TokenArgs {
            secret_file: secret.clone(),
            sub: "alice".into(),
            ttl: Duration::from_secs(60),
            model: vec!["mock-440hz".into()],
            max_session_secs: Some(30.0),
        })
        .unwrap();
        let grant = auth.check(&req(None, Some(&good), None)).unwrap();
        assert_eq!(grant.subject.as_deref(), Some("alice"));
        assert_eq!(grant.models, Some(vec!["mock-440hz".to_string()]));
        assert_eq!(grant.max_session, Some(Duration::from_secs(30)));

        let other = write(&dir, "other", "another-secret");
        let forged = mint(&TokenArgs {
            secret_file: other,
            sub: "mallory".into(),
            ttl: Duration::from_secs(60),
            model: vec![],
            max_session_secs: None,
        })
        .unwrap();
        assert_eq!(
            auth.check(&req(None, Some(&forged), None)),
            Err(Refusal::Invalid)
        );

        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &Claims {
                sub: None,
                exp: now - 3600,
                nbf: None,
                iat: None,
                model: None,
                max_session_secs: None,
            },
            &EncodingKey::from_secret(b"s3cret-s3cret-s3cret"),
        )
        .unwrap();
        assert_eq!(
            auth.check(&req(None, Some(&expired), None)),
            Err(Refusal::Expired)
        );

        // alg:none with the same claims as the good token.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let claims = good.split('.').nth(1).unwrap();
        let none = format!("{}.{claims}.", b64.encode(br#"{"alg":"none","typ":"JWT"}"#));
        assert_eq!(
            auth.check(&req(None, Some(&none), None)),
            Err(Refusal::Invalid)
        );
    }

    #[test]
    fn origin_policy() {
        let auth = Auth::new(AuthArgs {
            allowed_origins: vec!["https://app.example".into()],
            ..AuthArgs::default()
        })
        .unwrap();
        assert!(auth.check(&req(None, None, None)).is_ok(), "not a browser");
        assert!(auth
            .check(&req(None, None, Some("http://gw.example:8080")))
            .is_ok());
        assert!(auth
            .check(&req(None, None, Some("https://app.example")))
            .is_ok());
        assert_eq!(
            auth.check(&req(None, None, Some("https://evil.example"))),
            Err(Refusal::Origin)
        );
        assert_eq!(
            auth.check(&req(None, None, Some("null"))),
            Err(Refusal::Origin)
        );
        let any = Auth::new(AuthArgs {
            allowed_origins: vec!["*".into()],
            ..AuthArgs::default()
        })
        .unwrap();
        assert!(any
            .check(&req(None, None, Some("https://evil.example")))
            .is_ok());
    }

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_ttl("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_ttl("2d"), Ok(Duration::from_secs(172_800)));
        assert!(parse_ttl("1y").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }
}
