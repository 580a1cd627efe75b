//! Who a client is: verifies the JWTs clients present (the connect key, a join's or refresh's
//! `access_token`, a REST bearer) against the configured secret and JWKS, and yields their
//! claims.
//!
//! Owns: the key sources, the choice of key and algorithm for a token, the claim checks, and the
//! error strings clients match on (Supabase's). Must not: touch sockets or the database, or
//! decide what a role may see (authorization happens where channels and changes are).

pub mod jwks;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header};
use serde_json::{Map, Value};

use crate::auth::jwks::{Jwks, JwksError, JwksSource};

/// What a verified token says about its bearer.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims {
    pub role: Arc<str>,
    pub sub: Option<Arc<str>>,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// The whole claims object as JSON (what `request.jwt.claims` is set to).
    pub json: Arc<str>,
}

impl Claims {
    /// Time left before the token expires (zero once it has).
    pub fn time_left(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.exp - unix_now()).unwrap_or(0))
    }
}

/// A verified token and what it says.
#[derive(Debug, Clone, PartialEq)]
pub struct Credentials {
    pub token: Arc<str>,
    pub claims: Claims,
}

/// Why a token was refused; the messages are the ones Supabase Realtime sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("API key is missing")]
    Missing,
    #[error("The token provided is not a valid JWT")]
    Malformed,
    #[error("Failed to validate JWT signature")]
    Signature,
    #[error("Token has expired {0} seconds ago")]
    Expired(i64),
    #[error("Fields `role` and `exp` are required in JWT")]
    MissingClaims,
    #[error("Token expiration time is invalid")]
    InvalidExpiry,
    #[error("Token claim `{0}` is not valid")]
    Claim(String),
    #[error(
        "Failed to generate JWT signer for key ID (kid) {0:?}, check your JWT secret or JWKS configuration"
    )]
    UnknownKey(String),
    #[error("Failed to generate JWT signer, check your JWT secret or JWKS configuration")]
    NoKey,
}

impl AuthError {
    /// The code Supabase puts before the message in a refused join (`<Code>: <message>`).
    pub fn code(&self) -> &'static str {
        match self {
            AuthError::Missing => "MissingAPIKey",
            AuthError::Malformed => "MalformedJWT",
            AuthError::Signature => "JwtSignatureError",
            AuthError::UnknownKey(_) | AuthError::NoKey => "JwtSignerError",
            AuthError::Expired(_)
            | AuthError::MissingClaims
            | AuthError::InvalidExpiry
            | AuthError::Claim(_) => "InvalidJWTToken",
        }
    }

    /// The `{"error": …}` text of a refused WebSocket upgrade.
    pub fn connect_message(&self) -> String {
        match self {
            AuthError::Expired(_) => "Token has expired".into(),
            other => other.to_string(),
        }
    }
}

/// How the gateway treats tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every connection and join needs a valid token.
    Required,
    /// No token is checked: every client may read every published row. For trusted networks.
    Off,
}

/// Why the verifier could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("no key source: set auth.jwt_secret (WALCAST_AUTH__JWT_SECRET) or auth.jwks, or set auth.mode = \"off\" to accept every client")]
    NoKeySource,
    #[error("auth.jwks")]
    Jwks(#[from] JwksError),
}

/// Verifies tokens. Cheap to clone.
#[derive(Clone)]
pub struct Verifier(Arc<Inner>);

struct Inner {
    mode: AuthMode,
    secret: Option<Vec<u8>>,
    jwks: Option<Jwks>,
    /// Claims that must equal these values.
    expected: Vec<(String, String)>,
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier::off()
    }
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.0.mode)
            .field("secret", &self.0.secret.as_ref().map(|_| "***"))
            .field("jwks", &self.0.jwks.is_some())
            .finish()
    }
}

/// The settings a verifier is built from (the `[auth]` table).
#[derive(Debug, Clone, Default)]
pub struct VerifierSettings {
    pub mode: Option<AuthMode>,
    pub jwt_secret: Option<String>,
    pub jwks: Option<String>,
    pub jwks_refresh: Duration,
    pub claims: Vec<(String, String)>,
}

impl Verifier {
    /// A verifier that accepts every client without a token.
    pub fn off() -> Verifier {
        Verifier(Arc::new(Inner { mode: AuthMode::Off, secret: None, jwks: None, expected: Vec::new() }))
    }

    /// A verifier with only a shared secret (HS256/384/512).
    pub fn with_secret(secret: &str) -> Verifier {
        Verifier(Arc::new(Inner {
            mode: AuthMode::Required,
            secret: Some(secret.as_bytes().to_vec()),
            jwks: None,
            expected: Vec::new(),
        }))
    }

    /// Builds the verifier: a JWKS file or inline set must parse now; a JWKS URL is fetched now
    /// and, if that fails, again when a token needs it.
    pub async fn new(s: VerifierSettings) -> Result<Verifier, SetupError> {
        let mode = s.mode.unwrap_or(AuthMode::Required);
        let secret = s.jwt_secret.filter(|s| !s.is_empty()).map(String::into_bytes);
        let jwks = match s.jwks.as_deref().filter(|j| !j.trim().is_empty()) {
            Some(j) => Some(Jwks::load(JwksSource::parse(j), s.jwks_refresh).await?),
            None => None,
        };
        if mode == AuthMode::Required && secret.is_none() && jwks.is_none() {
            return Err(SetupError::NoKeySource);
        }
        Ok(Verifier(Arc::new(Inner { mode, secret, jwks, expected: s.claims })))
    }

    pub fn required(&self) -> bool {
        self.0.mode == AuthMode::Required
    }

    /// Verifies `token` and returns what it says.
    pub async fn verify(&self, token: &str) -> Result<Credentials, AuthError> {
        let token: String = token.chars().filter(|c| !c.is_whitespace()).collect();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let mut parts = token.splitn(3, '.');
        let (Some(h), Some(c), Some(sig)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed);
        };
        if sig.contains('.') {
            return Err(AuthError::Malformed);
        }
        let header = decode_object(h)?;
        let claims = decode_object(c)?;
        let alg_name = header.get("alg").and_then(Value::as_str).ok_or(AuthError::Malformed)?;
        let kid = header.get("kid").and_then(Value::as_str);
        let alg = algorithm(alg_name).ok_or(AuthError::NoKey)?;
        let key = self.key_for(alg, kid).await?;
        let message = &token[..h.len() + 1 + c.len()];
        match jsonwebtoken::crypto::verify(sig, message.as_bytes(), &key, alg) {
            Ok(true) => {}
            Ok(false) | Err(_) => return Err(AuthError::Signature),
        }
        let claims = self.check_claims(claims)?;
        Ok(Credentials { token: token.into(), claims })
    }

    /// The key a token of `alg` (with `kid`) must be signed with. The key's type always matches
    /// the algorithm's family.
    async fn key_for(&self, alg: Algorithm, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        let family = Family::of(alg);
        if let Some(jwks) = &self.0.jwks {
            let found = match kid {
                Some(kid) => jwks.find(kid).await,
                // Without a `kid`, a set with one key of the right type is unambiguous.
                None => jwks.only(|k| Family::of_jwk(k) == Some(family)).await,
            };
            match found {
                Some(jwk) if Family::of_jwk(&jwk) == Some(family) => {
                    return DecodingKey::from_jwk(&jwk).map_err(|_| AuthError::UnknownKey(kid_text(kid)));
                }
                // An HS token whose kid is not in the set is checked against the secret.
                _ if family == Family::Hmac => {}
                _ => return Err(AuthError::UnknownKey(kid_text(kid))),
            }
        }
        match (family, &self.0.secret) {
            (Family::Hmac, Some(secret)) => Ok(DecodingKey::from_secret(secret)),
            _ => Err(AuthError::NoKey),
        }
    }

    fn check_claims(&self, claims: Map<String, Value>) -> Result<Claims, AuthError> {
        let role = claims.get("role").and_then(Value::as_str);
        let exp = claims.get("exp");
        let (Some(role), Some(exp)) = (role, exp) else {
            return Err(AuthError::MissingClaims);
        };
        let exp = match exp {
            Value::Number(n) => n.as_f64().map(|f| f.round() as i64).ok_or(AuthError::InvalidExpiry)?,
            _ => return Err(AuthError::InvalidExpiry),
        };
        let now = unix_now();
        if exp <= now {
            return Err(AuthError::Expired(now - exp));
        }
        if claims.get("iat").is_some_and(|v| !v.is_number()) {
            return Err(AuthError::Claim("iat".into()));
        }
        if let Some(nbf) = claims.get("nbf") {
            if nbf.as_f64().is_none_or(|nbf| nbf > now as f64) {
                return Err(AuthError::Claim("nbf".into()));
            }
        }
        for (name, want) in &self.0.expected {
            let ok = match claims.get(name) {
                Some(Value::String(s)) => s == want,
                // `aud` may be a list: one of them must match.
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(AuthError::Claim(name.clone()));
            }
        }
        let sub = claims.get("sub").and_then(Value::as_str).map(Arc::from);
        let role = Arc::from(role);
        let json = Value::Object(claims).to_string().into();
        Ok(Claims { role, sub, exp, json })
    }
}

fn kid_text(kid: Option<&str>) -> String {
    kid.unwrap_or("").to_owned()
}

/// A base64url segment that holds a JSON object.
fn decode_object(segment: &str) -> Result<Map<String, Value>, AuthError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment.trim_end_matches('=')).map_err(|_| AuthError::Malformed)?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(AuthError::Malformed),
    }
}

/// The algorithms accepted, by their header names (`Ed25519` is RFC 8037's spelling of EdDSA).
fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "HS256" => Algorithm::HS256,
        "HS384" => Algorithm::HS384,
        "HS512" => Algorithm::HS512,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" | "Ed25519" => Algorithm::EdDSA,
        _ => return None,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Hmac,
    Rsa,
    Ec,
    Ed,
}

impl Family {
    fn of(alg: Algorithm) -> Family {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => Family::Hmac,
            Algorithm::ES256 | Algorithm::ES384 => Family::Ec,
            Algorithm::EdDSA => Family::Ed,
            _ => Family::Rsa,
        }
    }

    fn of_jwk(jwk: &Jwk) -> Option<Family> {
        Some(match &jwk.algorithm {
            AlgorithmParameters::OctetKey(_) => Family::Hmac,
            AlgorithmParameters::RSA(_) => Family::Rsa,
            AlgorithmParameters::EllipticCurve(_) => Family::Ec,
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != jsonwebtoken::jwk::EllipticCurve::Ed25519 {
                    return None;
                }
                Family::Ed
            }
        })
    }
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Why a token could not be made.
#[derive(Debug, thiserror::Error)]
#[error("signing a token")]
pub struct MintError(#[source] jsonwebtoken::errors::Error);

/// Signs an HS256 token with `role`, `exp` (now + `ttl`), `iat`, `sub` when given, and `extra`.
pub fn mint(
    secret: &str,
    role: &str,
    sub: Option<&str>,
    ttl: Duration,
    extra: Map<String, Value>,
) -> Result<String, MintError> {
    let now = unix_now();
    let mut claims = extra;
    claims.insert("role".into(), Value::from(role));
    claims.insert("iat".into(), Value::from(now));
    claims.insert("exp".into(), Value::from(now.saturating_add(ttl.as_secs() as i64)));
    if let Some(sub) = sub {
        claims.insert("sub".into(), Value::from(sub));
    }
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .map_err(MintError)
}

/// A random secret (48 bytes from the system's secure generator, base64url).
pub fn random_secret() -> Result<String, rustls::Error> {
    let mut bytes = [0u8; 48];
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
    Ok(URL_SAFE_NO_PAD.encode(bytes))
}
