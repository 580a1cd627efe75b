//! Authentication against a real gateway: the connect key, join and refresh tokens, expiry,
//! REST broadcast, a JWKS served over HTTP with key rotation, and the key-source rule at start.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};
use walcast::config::Config;

use crate::support::{
    self, anon_key, fresh_db, http_post_with, signed, token, token_expiring, wait_for, TestApp, Ws,
    TEST_SECRET,
};

const PATH: &str = "/realtime/v1/websocket";

/// Joins `realtime:<name>` (broadcast to self, with ack) bringing `access_token` when given;
/// returns the reply's payload.
async fn join_as(ws: &mut Ws, name: &str, access_token: Option<&str>) -> Value {
    let topic = format!("realtime:{name}");
    let mut payload = json!({"config": {"broadcast": {"self": true, "ack": true}}});
    if let Some(t) = access_token {
        payload["access_token"] = t.into();
    }
    let join_ref = format!("j-{name}");
    let r = ws.push(Some(&join_ref), &topic, "phx_join", payload).await;
    ws.recv_until("the join reply", |f| {
        let (t, e, _, fr, _) = ws_parts(f);
        t == topic && e == "phx_reply" && fr.as_str() == Some(r.as_str())
    })
    .await[4]
        .clone()
}

/// (topic, event, payload, ref) of a 2.0.0 frame.
fn ws_parts(f: &Value) -> (String, String, Value, Value, Value) {
    (
        f[2].as_str().unwrap_or("").into(),
        f[3].as_str().unwrap_or("").into(),
        f[4].clone(),
        f[1].clone(),
        f[0].clone(),
    )
}

/// Broadcasts on a joined channel and waits for the ack and the echo: the channel is open.
async fn still_open(ws: &mut Ws, name: &str) {
    let topic = format!("realtime:{name}");
    let join_ref = format!("j-{name}");
    let r = ws
        .push(
            Some(&join_ref),
            &topic,
            "broadcast",
            json!({"type": "broadcast", "event": "ping", "payload": {}}),
        )
        .await;
    let (mut acked, mut echoed) = (false, false);
    while !(acked && echoed) {
        let f = ws.recv_until("the broadcast ack and echo", |_| true).await;
        if f[3] == "phx_reply" && f[1].as_str() == Some(r.as_str()) {
            assert_eq!(f[4]["status"], "ok", "{topic} is open: {f}");
            acked = true;
        } else if f["binary"]["topic"] == topic.as_str() && f["binary"]["event"] == "ping" {
            echoed = true;
        } else {
            panic!("{topic}: unexpected {f}");
        }
    }
}

/// Waits for the `system` error and `phx_close` that close `name`; returns the message.
async fn closed_with(ws: &mut Ws, name: &str) -> String {
    let topic = format!("realtime:{name}");
    let system = ws.recv_until("a system error", |f| f[2] == topic.as_str() && f[3] == "system").await;
    assert_eq!(system[4]["status"], "error", "{system}");
    ws.recv_until("phx_close", |f| f[2] == topic.as_str() && f[3] == "phx_close").await;
    system[4]["message"].as_str().unwrap_or("").to_owned()
}

#[tokio::test]
async fn the_connect_key_must_verify() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let refused = |key: Option<String>| {
        let addr = app.addr;
        async move {
            match Ws::connect_with(addr, PATH, Some("2.0.0"), key.as_deref()).await {
                Ok(_) => panic!("connected with {key:?}"),
                Err((status, body)) => {
                    assert_eq!(status, 401, "{body}");
                    serde_json::from_str::<Value>(&body).expect("JSON body")["error"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned()
                }
            }
        }
    };
    assert_eq!(refused(None).await, "API key is missing");
    assert_eq!(refused(Some("not-a-jwt".into())).await, "The token provided is not a valid JWT");
    assert_eq!(refused(Some(token_expiring("anon", None, -10))).await, "Token has expired");
    let wrong_key =
        signed(&json!({"role": "anon", "exp": walcast::auth::unix_now() + 60}), "x".repeat(40).as_str());
    assert_eq!(refused(Some(wrong_key)).await, "Failed to validate JWT signature");
    let no_role = signed(&json!({"exp": walcast::auth::unix_now() + 60}), TEST_SECRET);
    assert_eq!(refused(Some(no_role)).await, "Fields `role` and `exp` are required in JWT");
    let header = URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "JWT"}).to_string());
    let body = URL_SAFE_NO_PAD
        .encode(json!({"role": "service_role", "exp": walcast::auth::unix_now() + 60}).to_string());
    let none = refused(Some(format!("{header}.{body}."))).await;
    assert!(none.starts_with("Failed to generate JWT signer"), "{none}");
    // A good key, in the query or in the x-api-key header.
    assert!(Ws::connect_with(app.addr, PATH, Some("2.0.0"), Some(&anon_key())).await.is_ok());
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}{PATH}?vsn=2.0.0",
        app.addr
    ))
    .expect("request");
    req.headers_mut().insert("x-api-key", anon_key().parse().expect("header"));
    tokio_tungstenite::connect_async(req).await.expect("the x-api-key header is accepted");
    let metrics = support::http_get(&format!("http://{}/metrics", app.addr)).await.expect("metrics");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("walcast_auth_refused_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the counter");
    assert_eq!(refused, 6, "every refused upgrade is counted");
    app.stop().await;
}

#[tokio::test]
async fn join_tokens_refresh_and_expiry() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let mut ws = app.ws(Some("2.0.0")).await;

    // A join's own token wins over the connect key; bad ones are refused with Supabase's reasons.
    let reply = join_as(&mut ws, "expired", Some(&token_expiring("authenticated", Some("u1"), -30))).await;
    assert_eq!(reply["status"], "error");
    let reason = reply["response"]["reason"].as_str().unwrap_or("");
    assert!(reason.starts_with("InvalidJWTToken: Token has expired 3"), "{reason}");
    let reply = join_as(&mut ws, "garbage", Some("garbage")).await;
    assert_eq!(reply["response"]["reason"], "MalformedJWT: The token provided is not a valid JWT");
    let forged =
        signed(&json!({"role": "service_role", "exp": walcast::auth::unix_now() + 60}), &"y".repeat(40));
    let reply = join_as(&mut ws, "forged", Some(&forged)).await;
    assert_eq!(reply["response"]["reason"], "JwtSignatureError: Failed to validate JWT signature");
    // Supabase's opaque API keys stand for "no user token": the connect key is used.
    assert_eq!(join_as(&mut ws, "api-key", Some("sb_publishable_abc")).await["status"], "ok");
    assert_eq!(join_as(&mut ws, "user", Some(&token("authenticated", Some("u1")))).await["status"], "ok");
    still_open(&mut ws, "user").await;

    // A refresh with the same or a new valid token has no reply and keeps the channel open.
    let fresh = token("authenticated", Some("u1"));
    ws.push(Some("j-user"), "realtime:user", "access_token", json!({"access_token": fresh})).await;
    ws.expect_quiet("a good refresh has no reply").await;
    still_open(&mut ws, "user").await;
    // A bad one closes the channel with a system error.
    ws.push(Some("j-user"), "realtime:user", "access_token", json!({"access_token": "garbage"})).await;
    assert_eq!(closed_with(&mut ws, "user").await, "The token provided is not a valid JWT");

    // A channel closes when its token expires, on a timer; a refresh before then moves the timer.
    // `short` would expire a second before `later`; it is refreshed, so when `later` closes,
    // `short` must still be open.
    let reply = join_as(&mut ws, "short", Some(&token_expiring("authenticated", Some("u1"), 2))).await;
    assert_eq!(reply["status"], "ok");
    let reply = join_as(&mut ws, "later", Some(&token_expiring("authenticated", Some("u1"), 3))).await;
    assert_eq!(reply["status"], "ok");
    ws.push(Some("j-short"), "realtime:short", "access_token", json!({"access_token": fresh})).await;
    let message = closed_with(&mut ws, "later").await;
    assert!(message.starts_with("Token has expired "), "{message}");
    still_open(&mut ws, "short").await;
    app.stop().await;
}

#[tokio::test]
async fn rest_broadcast_needs_a_token() {
    let url = fresh_db().await;
    let app = TestApp::spawn(&url).await;
    let mut ws = app.ws(Some("2.0.0")).await;
    assert_eq!(join_as(&mut ws, "room", None).await["status"], "ok");
    let body = br#"{"messages":[{"topic":"room","event":"rest","payload":{"n":1}}]}"#;
    let json = "Content-Type: application/json";
    let (status, text) = http_post_with(app.addr, "/api/broadcast", &[json], body).await;
    assert_eq!((status, text.as_str()), (401, r#"{"message":"Unauthorized"}"#));
    let bad = "Authorization: Bearer garbage".to_owned();
    assert_eq!(http_post_with(app.addr, "/api/broadcast", &[json, &bad], body).await.0, 401);
    let expired = format!("apikey: {}", token_expiring("service_role", None, -5));
    assert_eq!(http_post_with(app.addr, "/api/broadcast", &[json, &expired], body).await.0, 401);
    // Bearer wins over apikey.
    let bearer = format!("Authorization: Bearer {}", token("service_role", None));
    let (status, _) =
        http_post_with(app.addr, "/api/broadcast", &[json, &bearer, "apikey: garbage"], body).await;
    assert_eq!(status, 202);
    let got = ws.recv_until("the REST broadcast", |f| f[3] == "broadcast" || f.get("binary").is_some()).await;
    assert_eq!(got["binary"]["payload"], json!({"n": 1}), "{got}");
    // Nothing from the refused requests was delivered.
    ws.expect_quiet("refused requests deliver nothing").await;
    let single = format!("apikey: {}", anon_key());
    let (status, _) =
        http_post_with(app.addr, "/api/broadcast/room/events/one", &[json, &single], b"{}").await;
    assert_eq!(status, 202);
    app.stop().await;
}

/// An RSA key from openssl: (PKCS#1 DER private key, JWK of the public key).
fn rsa_key(kid: &str) -> (Vec<u8>, Value) {
    let dir = std::env::temp_dir().join(format!("walcast-rsa-{}-{kid}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let pem = dir.join("key.pem");
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out.stdout
    };
    let pem_path = pem.to_str().expect("path");
    run(&["genrsa", "-out", pem_path, "2048"]);
    let der = run(&["rsa", "-in", pem_path, "-outform", "DER", "-traditional"]);
    let modulus = String::from_utf8(run(&["rsa", "-in", pem_path, "-noout", "-modulus"])).expect("text");
    let hex = modulus.trim().trim_start_matches("Modulus=");
    let n: Vec<u8> =
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex")).collect();
    let _ = std::fs::remove_dir_all(&dir);
    (
        der,
        json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig", "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB"}),
    )
}

fn rs256(der: &[u8], kid: &str, role: &str) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = json!({"role": role, "exp": walcast::auth::unix_now() + 600});
    jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_rsa_der(der)).expect("token")
}

#[tokio::test]
async fn jwks_from_a_url_with_key_rotation() {
    let (der1, jwk1) = rsa_key("k1");
    let (der2, jwk2) = rsa_key("k2");
    // The identity provider: serves whatever set `keys` holds, and counts fetches.
    let keys = Arc::new(Mutex::new(json!({"keys": [jwk1]})));
    let served = Arc::clone(&keys);
    let idp = axum::Router::new().route(
        "/.well-known/jwks.json",
        axum::routing::get(move || {
            let set = served.lock().map(|k| k.clone()).unwrap_or_default();
            async move { axum::Json(set) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let idp_addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, idp).await });

    let url = fresh_db().await;
    // Keys over plain HTTP only when allowed explicitly.
    let mut config = Config { database_url: Some(url.clone()), ..Config::default() };
    config.auth.jwks = Some(format!("http://{idp_addr}/.well-known/jwks.json"));
    let refused = walcast::Gateway::prepare(config, true).await.err().expect("http:// refused");
    let msg = support::error_text(&refused);
    assert!(msg.contains("auth.jwks") && msg.contains("jwks_allow_http"), "{msg}");
    let app = TestApp::spawn_with(&url, |c: &mut Config| {
        c.auth.jwt_secret = None;
        c.auth.jwks = Some(format!("http://{idp_addr}/.well-known/jwks.json"));
        c.auth.jwks_allow_http = true;
        c.auth.jwks_refresh_secs = 3600;
    })
    .await;
    assert!(Ws::connect_with(app.addr, PATH, Some("2.0.0"), Some(&rs256(&der1, "k1", "anon"))).await.is_ok());
    // Only a JWKS is configured: an HS token has no key.
    let hs = Ws::connect_with(app.addr, PATH, Some("2.0.0"), Some(&anon_key())).await.err().expect("refused");
    assert!(hs.1.contains("Failed to generate JWT signer"), "{}", hs.1);
    // A key the provider has not published yet is unknown.
    let early = Ws::connect_with(app.addr, PATH, Some("2.0.0"), Some(&rs256(&der2, "k2", "anon"))).await;
    let early = early.err().expect("refused");
    assert_eq!(early.0, 401);
    assert!(early.1.contains("k2"), "{}", early.1);
    // Rotation: the provider publishes k2; a token signed with it is accepted once the gateway
    // fetches the set again (an unknown kid triggers that, at most every 10 s).
    if let Ok(mut k) = keys.lock() {
        *k = json!({"keys": [jwk1.clone(), jwk2]});
    }
    let k2 = rs256(&der2, "k2", "anon");
    wait_for("the rotated key to be accepted", Duration::from_secs(60), || {
        let k2 = k2.clone();
        let addr = app.addr;
        async move { Ws::connect_with(addr, PATH, Some("2.0.0"), Some(&k2)).await.ok().map(|_| ()) }
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn serve_needs_a_key_source_unless_auth_is_off() {
    let url = fresh_db().await;
    let config = Config {
        database_url: Some(url.clone()),
        listen: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    let e = walcast::Gateway::prepare(config, true).await.err().expect("refuses to start");
    let msg = support::error_text(&e);
    assert!(msg.contains("no key source") && msg.contains("WALCAST_AUTH__JWT_SECRET"), "{msg}");
    let app = TestApp::spawn_with(&url, |c| {
        c.auth.jwt_secret = None;
        c.auth.mode = walcast::config::AuthMode::Off;
    })
    .await;
    // Off: no key, or any string, is accepted.
    let mut ws = Ws::connect_with(app.addr, PATH, Some("2.0.0"), None).await.expect("connects without a key");
    assert_eq!(join_as(&mut ws, "open", Some("anything")).await["status"], "ok");
    app.stop().await;
}
