//! Who a client is: verifies the JWTs clients present (the connect key, a join's or refresh's
//! `access_token`, a REST bearer) against the configured secret and JWKS, and yields their
//! claims.
//!
//! Owns: the key sources, the choice of key and algorithm for a token, the claim checks, and the
//! error strings clients match on (Supabase's). Must not: touch sockets or the database, or
//! decide what a role may see (authorization happens where channels and changes are).

pub mod jwks;
pub mod rls;
pub mod topics;

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
    /// Time left before the token expires (zero once it has; at most a century).
    pub fn time_left(&self) -> Duration {
        let secs = u64::try_from(self.exp.saturating_sub(unix_now())).unwrap_or(0);
        Duration::from_secs(secs.min(100 * 365 * 24 * 3600))
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
    /// The `role` claim names a role tokens may not act as (not in `auth.roles`).
    #[error("Token role {0:?} is not allowed")]
    Role(String),
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
            | AuthError::Claim(_)
            | AuthError::Role(_) => "InvalidJWTToken",
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
    jwks: Option<Arc<Jwks>>,
    /// Claims that must equal these values.
    expected: Vec<(String, String)>,
    /// The roles a token may name: any other is refused, so that a signed token cannot act as
    /// the gateway's own login (`none` resets to it) or another privileged role.
    roles: Vec<Arc<str>>,
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
    /// The roles a token may name; `None` for [`DEFAULT_ROLES`].
    pub roles: Option<Vec<String>>,
}

/// The roles tokens may act as unless `auth.roles` says otherwise (Supabase's).
pub const DEFAULT_ROLES: [&str; 3] = ["anon", "authenticated", "service_role"];

fn default_roles() -> Vec<Arc<str>> {
    DEFAULT_ROLES.iter().map(|r| Arc::from(*r)).collect()
}

impl Verifier {
    /// A verifier that accepts every client without a token.
    pub fn off() -> Verifier {
        Verifier(Arc::new(Inner {
            mode: AuthMode::Off,
            secret: None,
            jwks: None,
            expected: Vec::new(),
            roles: default_roles(),
        }))
    }

    /// A verifier with only a shared secret (HS256/384/512).
    pub fn with_secret(secret: &str) -> Verifier {
        Verifier(Arc::new(Inner {
            mode: AuthMode::Required,
            secret: Some(secret.as_bytes().to_vec()),
            jwks: None,
            expected: Vec::new(),
            roles: default_roles(),
        }))
    }

    /// Builds the verifier: a JWKS file or inline set must parse now; a JWKS URL is fetched now
    /// and, if that fails, again when a token needs it.
    pub async fn new(s: VerifierSettings) -> Result<Verifier, SetupError> {
        let mode = s.mode.unwrap_or(AuthMode::Required);
        let secret = s.jwt_secret.filter(|s| !s.is_empty()).map(String::into_bytes);
        let jwks = match s.jwks.as_deref().filter(|j| !j.trim().is_empty()) {
            Some(j) => Some(Arc::new(Jwks::load(JwksSource::parse(j), s.jwks_refresh).await?)),
            None => None,
        };
        if mode == AuthMode::Required && secret.is_none() && jwks.is_none() {
            return Err(SetupError::NoKeySource);
        }
        let roles = match s.roles {
            Some(roles) => roles.iter().map(|r| Arc::from(r.as_str())).collect(),
            None => default_roles(),
        };
        Ok(Verifier(Arc::new(Inner { mode, secret, jwks, expected: s.claims, roles })))
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
            return Err(AuthError::Expired(now.saturating_sub(exp)));
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
        let Some(role) = self.0.roles.iter().find(|r| &***r == role) else {
            return Err(AuthError::Role(role.chars().take(64).collect()));
        };
        let role = Arc::clone(role);
        let sub = claims.get("sub").and_then(Value::as_str).map(Arc::from);
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

#[cfg(test)]
mod tests {
    use jsonwebtoken::{encode, EncodingKey, Header};
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
    use serde_json::json;

    use super::*;

    const SECRET: &str = "unit-test-secret-unit-test-secret-0123";

    fn claims(role: &str, exp_in: i64) -> Value {
        json!({"role": role, "exp": unix_now() + exp_in, "sub": "user-1", "iat": unix_now()})
    }

    fn hs(claims: &Value, secret: &str) -> String {
        encode(&Header::new(Algorithm::HS256), claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(v.to_string())
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    fn verifier(secret: Option<&str>, jwks: Option<Value>, claims: &[(&str, &str)]) -> Verifier {
        block_on(Verifier::new(VerifierSettings {
            mode: None,
            jwt_secret: secret.map(str::to_owned),
            jwks: jwks.map(|j| j.to_string()),
            jwks_refresh: Duration::from_secs(60),
            claims: claims.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            roles: None,
        }))
        .unwrap()
    }

    #[test]
    fn only_the_allowed_roles_pass() {
        let v = verifier(Some(SECRET), None, &[]);
        for role in DEFAULT_ROLES {
            assert_eq!(&*check(&v, &hs(&claims(role, 60), SECRET)).unwrap().claims.role, role);
        }
        // `none` would reset to the gateway's login; the others are privileged or unknown.
        for role in ["none", "NONE", "postgres", "", "pg_read_all_data", "Authenticated", "anon "] {
            let refused = check(&v, &hs(&claims(role, 60), SECRET));
            assert_eq!(refused, Err(AuthError::Role(role.into())), "{role:?}");
        }
        let err = AuthError::Role("none".into());
        assert_eq!(format!("{}: {err}", err.code()), "InvalidJWTToken: Token role \"none\" is not allowed");
        let custom = block_on(Verifier::new(VerifierSettings {
            jwt_secret: Some(SECRET.into()),
            roles: Some(vec!["reader".into()]),
            ..Default::default()
        }))
        .unwrap();
        assert!(check(&custom, &hs(&claims("reader", 60), SECRET)).is_ok());
        assert_eq!(check(&custom, &hs(&claims("anon", 60), SECRET)), Err(AuthError::Role("anon".into())));
    }

    fn check(v: &Verifier, token: &str) -> Result<Credentials, AuthError> {
        block_on(v.verify(token))
    }

    #[test]
    fn hs_tokens_verify_and_carry_their_claims() {
        let v = verifier(Some(SECRET), None, &[]);
        let c = check(&v, &hs(&claims("authenticated", 60), SECRET)).unwrap();
        assert_eq!((&*c.claims.role, c.claims.sub.as_deref()), ("authenticated", Some("user-1")));
        let json: Value = serde_json::from_str(&c.claims.json).unwrap();
        assert_eq!(json["sub"], "user-1");
        assert!(c.claims.time_left() > Duration::from_secs(50));
        for alg in [Algorithm::HS384, Algorithm::HS512] {
            let t =
                encode(&Header::new(alg), &claims("anon", 60), &EncodingKey::from_secret(SECRET.as_bytes()));
            assert!(check(&v, &t.unwrap()).is_ok(), "{alg:?}");
        }
    }

    #[test]
    fn refusals_carry_supabase_messages() {
        let v = verifier(Some(SECRET), None, &[]);
        assert_eq!(check(&v, ""), Err(AuthError::Missing));
        assert_eq!(check(&v, "not-a-jwt"), Err(AuthError::Malformed));
        assert_eq!(check(&v, "a.b"), Err(AuthError::Malformed));
        assert_eq!(check(&v, "!!.??.x"), Err(AuthError::Malformed));
        assert_eq!(
            check(&v, &hs(&claims("anon", 60), "another-secret-another-secret-0123")),
            Err(AuthError::Signature)
        );
        let expired = check(&v, &hs(&claims("anon", -30), SECRET));
        assert!(matches!(expired, Err(AuthError::Expired(n)) if (30..=32).contains(&n)), "{expired:?}");
        assert_eq!(expired.unwrap_err().connect_message(), "Token has expired");
        assert_eq!(check(&v, &hs(&json!({"role": "anon"}), SECRET)), Err(AuthError::MissingClaims));
        assert_eq!(check(&v, &hs(&json!({"exp": unix_now() + 60}), SECRET)), Err(AuthError::MissingClaims));
        assert_eq!(
            check(&v, &hs(&json!({"role": "anon", "exp": "soon"}), SECRET)),
            Err(AuthError::InvalidExpiry)
        );
        let bad_iat = json!({"role": "anon", "exp": unix_now() + 60, "iat": "x"});
        assert_eq!(check(&v, &hs(&bad_iat, SECRET)), Err(AuthError::Claim("iat".into())));
        let later = json!({"role": "anon", "exp": unix_now() + 60, "nbf": unix_now() + 30});
        assert_eq!(check(&v, &hs(&later, SECRET)), Err(AuthError::Claim("nbf".into())));
        // alg none: no signer, whatever the signature part says.
        let none = format!("{}.{}.", b64(&json!({"alg": "none", "typ": "JWT"})), b64(&claims("anon", 60)));
        assert_eq!(check(&v, &none), Err(AuthError::NoKey));
        // Extreme expiries neither overflow nor panic.
        assert!(matches!(
            check(&v, &hs(&json!({"role": "anon", "exp": -9.2e18}), SECRET)),
            Err(AuthError::Expired(_))
        ));
        let far = check(&v, &hs(&json!({"role": "anon", "exp": 9.2e18}), SECRET)).unwrap();
        assert!(std::time::Instant::now().checked_add(far.claims.time_left()).is_some());
        let err = AuthError::Expired(5);
        assert_eq!(format!("{}: {err}", err.code()), "InvalidJWTToken: Token has expired 5 seconds ago");
    }

    #[test]
    fn a_changed_payload_breaks_the_signature() {
        let v = verifier(Some(SECRET), None, &[]);
        let t = hs(&claims("anon", 60), SECRET);
        let parts: Vec<&str> = t.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], b64(&claims("service_role", 60)), parts[2]);
        assert_eq!(check(&v, &forged), Err(AuthError::Signature));
    }

    #[test]
    fn claim_validators_match_exactly() {
        let v = verifier(Some(SECRET), None, &[("iss", "https://auth.example"), ("aud", "authenticated")]);
        let mut c = claims("authenticated", 60);
        c["iss"] = json!("https://auth.example");
        c["aud"] = json!(["other", "authenticated"]);
        assert!(check(&v, &hs(&c, SECRET)).is_ok());
        c["iss"] = json!("https://evil.example");
        assert_eq!(check(&v, &hs(&c, SECRET)), Err(AuthError::Claim("iss".into())));
    }

    fn ec_key() -> (Vec<u8>, Value) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        let public = pair.public_key().as_ref();
        let jwk = json!({"kty": "EC", "crv": "P-256", "kid": "ec-1", "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]), "y": URL_SAFE_NO_PAD.encode(&public[33..65])});
        (pkcs8.as_ref().to_vec(), jwk)
    }

    fn ed_key() -> (Vec<u8>, Value) {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let jwk = json!({"kty": "OKP", "crv": "Ed25519", "kid": "ed-1",
            "x": URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())});
        (pkcs8.as_ref().to_vec(), jwk)
    }

    fn signed(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, c: &Value) -> String {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_owned);
        encode(&h, c, key).unwrap()
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_type() {
        let (ec_der, ec_jwk) = ec_key();
        let (ed_der, ed_jwk) = ed_key();
        let rsa_jwk = json!({"kty": "RSA", "kid": "rsa-1", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"});
        // An X25519 key cannot verify anything: it is skipped, the rest of the set still loads.
        let x25519 =
            json!({"kty": "OKP", "crv": "X25519", "kid": "x-1", "x": URL_SAFE_NO_PAD.encode([7u8; 32])});
        let set = json!({"keys": [ec_jwk, ed_jwk, rsa_jwk, x25519, {"kty": "weird"}]});
        let v = verifier(None, Some(set), &[]);
        let ec = EncodingKey::from_ec_der(&ec_der);
        let ed = EncodingKey::from_ed_der(&ed_der);
        assert!(check(&v, &signed(Algorithm::ES256, Some("ec-1"), &ec, &claims("anon", 60))).is_ok());
        assert!(check(&v, &signed(Algorithm::EdDSA, Some("ed-1"), &ed, &claims("anon", 60))).is_ok());
        // Without a kid, the only key of the right type is used.
        assert!(check(&v, &signed(Algorithm::ES256, None, &ec, &claims("anon", 60))).is_ok());
        // RFC 8037 spelling of the algorithm.
        let t = signed(Algorithm::EdDSA, Some("ed-1"), &ed, &claims("anon", 60));
        let parts: Vec<&str> = t.split('.').collect();
        let header = b64(&json!({"alg": "Ed25519", "kid": "ed-1"}));
        let msg = format!("{header}.{}", parts[1]);
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &ed, Algorithm::EdDSA).unwrap();
        assert!(check(&v, &format!("{msg}.{sig}")).is_ok());
        // Unknown kid, a key of another type under the named kid, a wrong key.
        let unknown = signed(Algorithm::ES256, Some("nope"), &ec, &claims("anon", 60));
        assert_eq!(check(&v, &unknown), Err(AuthError::UnknownKey("nope".into())));
        let mismatched = signed(Algorithm::ES256, Some("rsa-1"), &ec, &claims("anon", 60));
        assert_eq!(check(&v, &mismatched), Err(AuthError::UnknownKey("rsa-1".into())));
        let (other_der, _) = ec_key();
        let wrong = signed(
            Algorithm::ES256,
            Some("ec-1"),
            &EncodingKey::from_ec_der(&other_der),
            &claims("anon", 60),
        );
        assert_eq!(check(&v, &wrong), Err(AuthError::Signature));
        // Only a JWKS is configured: an HS token has no key.
        assert_eq!(check(&v, &hs(&claims("anon", 60), SECRET)), Err(AuthError::NoKey));
    }

    #[test]
    fn hs_tokens_use_an_oct_key_by_kid_else_the_secret() {
        let k = "oct-key-oct-key-oct-key-oct-key-0123";
        let set = json!({"keys": [{"kty": "oct", "kid": "h-1", "k": URL_SAFE_NO_PAD.encode(k)}]});
        let v = verifier(Some(SECRET), Some(set), &[]);
        assert!(check(
            &v,
            &signed(
                Algorithm::HS256,
                Some("h-1"),
                &EncodingKey::from_secret(k.as_bytes()),
                &claims("anon", 60)
            )
        )
        .is_ok());
        let other_kid = signed(
            Algorithm::HS256,
            Some("h-2"),
            &EncodingKey::from_secret(SECRET.as_bytes()),
            &claims("anon", 60),
        );
        assert!(check(&v, &other_kid).is_ok(), "an HS kid not in the set falls back to the secret");
    }

    #[test]
    fn settings_need_a_key_source_unless_off() {
        let none = block_on(Verifier::new(VerifierSettings::default()));
        assert!(matches!(none, Err(SetupError::NoKeySource)));
        let off =
            block_on(Verifier::new(VerifierSettings { mode: Some(AuthMode::Off), ..Default::default() }));
        assert!(!off.unwrap().required());
        let bad = block_on(Verifier::new(VerifierSettings {
            jwks: Some("{\"nokeys\":1}".into()),
            ..Default::default()
        }));
        assert!(matches!(bad, Err(SetupError::Jwks(JwksError::Shape))));
    }

    #[test]
    fn minted_tokens_verify() {
        let t = mint(SECRET, "service_role", Some("u"), Duration::from_secs(60), Map::new()).unwrap();
        let c = check(&verifier(Some(SECRET), None, &[]), &t).unwrap();
        assert_eq!(&*c.claims.role, "service_role");
        assert_eq!(random_secret().unwrap().len(), 64);
        assert_ne!(random_secret().unwrap(), random_secret().unwrap());
    }
}
