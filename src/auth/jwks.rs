//! A JSON Web Key Set from a URL (fetched, cached, refreshed on a schedule and when a token names
//! an unknown `kid`), a file, or inline JSON.
//!
//! Owns: fetching and parsing key sets; a key the library cannot use is skipped with a warning,
//! never failing the whole set. Must not: verify tokens (that is the verifier's).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::Jwk;
use serde_json::Value;

/// Where the key set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Url(String),
    File(PathBuf),
    Inline(String),
}

impl JwksSource {
    /// `http(s)://…` is a URL, text starting with `{` is the set itself, anything else a path.
    pub fn parse(s: &str) -> JwksSource {
        let t = s.trim();
        if t.starts_with("http://") || t.starts_with("https://") {
            JwksSource::Url(t.to_owned())
        } else if t.starts_with('{') {
            JwksSource::Inline(t.to_owned())
        } else {
            JwksSource::File(PathBuf::from(t))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("fetching {url}")]
    Fetch {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("fetching {url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("not a JWK set: expected a JSON object with a `keys` array")]
    Shape,
}

/// After a miss, the set is fetched again at most this often.
const MISS_REFETCH: Duration = Duration::from_secs(10);
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A key set and, for a URL, when it was last fetched.
pub struct Jwks {
    source: JwksSource,
    refresh: Duration,
    keys: RwLock<Arc<Vec<Jwk>>>,
    /// Serializes fetches; holds when the last one was attempted.
    fetched: Arc<tokio::sync::Mutex<Option<Instant>>>,
    client: Option<reqwest::Client>,
}

impl Jwks {
    /// Loads the set. A file or inline set must parse; a URL that cannot be fetched now is
    /// logged and tried again when a token needs it.
    pub async fn load(source: JwksSource, refresh: Duration) -> Result<Jwks, JwksError> {
        let (keys, client) = match &source {
            JwksSource::Inline(text) => (parse_set(text.as_bytes())?, None),
            JwksSource::File(path) => {
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|source| JwksError::Read { path: path.clone(), source })?;
                (parse_set(&bytes)?, None)
            }
            JwksSource::Url(_) => {
                let client = reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .build()
                    .map_err(|source| JwksError::Fetch { url: String::new(), source })?;
                (Vec::new(), Some(client))
            }
        };
        let jwks = Jwks {
            source,
            refresh: refresh.max(Duration::from_secs(1)),
            keys: RwLock::new(Arc::new(keys)),
            fetched: Arc::new(tokio::sync::Mutex::new(None)),
            client,
        };
        if let JwksSource::Url(url) = &jwks.source {
            if let Err(e) = jwks.fetch(&mut *jwks.fetched.lock().await).await {
                tracing::warn!(url = %url, error = %crate::errors::chain(&e), "JWKS not fetched; retrying when a token needs it");
            }
        }
        Ok(jwks)
    }

    fn current(&self) -> Arc<Vec<Jwk>> {
        Arc::clone(&crate::locks::read(&self.keys))
    }

    /// The key with this `kid`, fetching the set again when it is stale or (at most every 10 s)
    /// when the key is unknown — keys rotate.
    pub async fn find(self: &Arc<Self>, kid: &str) -> Option<Jwk> {
        let lookup = |keys: &[Jwk]| keys.iter().find(|k| k.common.key_id.as_deref() == Some(kid)).cloned();
        self.refresh_if(false).await;
        if let Some(k) = lookup(&self.current()) {
            return Some(k);
        }
        if self.refresh_if(true).await {
            return lookup(&self.current());
        }
        None
    }

    /// The one key that satisfies `pred`, if exactly one does.
    pub async fn only(self: &Arc<Self>, pred: impl Fn(&Jwk) -> bool) -> Option<Jwk> {
        self.refresh_if(false).await;
        let keys = self.current();
        let mut it = keys.iter().filter(|k| pred(k));
        match (it.next(), it.next()) {
            (Some(k), None) => Some(k.clone()),
            _ => None,
        }
    }

    /// Fetches a URL set again when it is older than the refresh period, or (`missed`) when a
    /// key was not found and the last attempt is older than 10 s. One fetch at a time: a
    /// scheduled refresh runs in the background while tokens are verified with the keys at
    /// hand (it is waited for only when there are none); a miss waits for a fetch in flight and
    /// starts one only if none ended within 10 s. Returns whether the keys may have changed.
    async fn refresh_if(self: &Arc<Self>, missed: bool) -> bool {
        if self.client.is_none() {
            return false;
        }
        if !missed {
            let Ok(mut last) = Arc::clone(&self.fetched).try_lock_owned() else { return false };
            if last.is_some_and(|at| at.elapsed() < self.refresh) {
                return false;
            }
            if self.current().is_empty() {
                self.fetch_logged(&mut last).await;
                return true;
            }
            // The fetch holds the lock until it ends: a miss meanwhile waits for it.
            let jwks = Arc::clone(self);
            tokio::spawn(async move { jwks.fetch_logged(&mut last).await });
            return false;
        }
        let mut last = self.fetched.lock().await;
        if last.is_some_and(|at| at.elapsed() < MISS_REFETCH) {
            // Fetched moments ago (perhaps by the caller this one waited for).
            return true;
        }
        self.fetch_logged(&mut last).await;
        true
    }

    async fn fetch_logged(&self, last: &mut Option<Instant>) {
        if let Err(e) = self.fetch(last).await {
            tracing::warn!(error = %crate::errors::chain(&e), "JWKS refresh failed; keeping the keys we have");
        }
    }

    async fn fetch(&self, last: &mut Option<Instant>) -> Result<(), JwksError> {
        let (JwksSource::Url(url), Some(client)) = (&self.source, &self.client) else { return Ok(()) };
        *last = Some(Instant::now());
        let fetch = |source| JwksError::Fetch { url: url.clone(), source };
        let resp = client.get(url).send().await.map_err(fetch)?;
        if !resp.status().is_success() {
            return Err(JwksError::Status { url: url.clone(), status: resp.status().as_u16() });
        }
        let body = resp.bytes().await.map_err(fetch)?;
        let keys = parse_set(&body)?;
        tracing::info!(url = %url, keys = keys.len(), "JWKS fetched");
        *crate::locks::write(&self.keys) = Arc::new(keys);
        Ok(())
    }
}

/// Parses a key set, skipping (with a warning) keys the verifier cannot use.
pub fn parse_set(bytes: &[u8]) -> Result<Vec<Jwk>, JwksError> {
    let Ok(Value::Object(mut set)) = serde_json::from_slice::<Value>(bytes) else {
        return Err(JwksError::Shape);
    };
    let Some(Value::Array(keys)) = set.remove("keys") else {
        return Err(JwksError::Shape);
    };
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let kid = k.get("kid").and_then(Value::as_str).unwrap_or("").to_owned();
        match serde_json::from_value::<Jwk>(k) {
            Ok(jwk) => out.push(jwk),
            Err(e) => tracing::warn!(kid = %kid, error = %e, "skipping a JWKS key that cannot be used"),
        }
    }
    Ok(out)
}
