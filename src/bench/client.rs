//! The harness's side of a WebSocket: sockets sized as the gateway sizes its own, opened in
//! batches, and Phoenix joins that wait for their answer. Shared by every socket scenario and
//! the relay. Must not: measure anything (the scenarios do).

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

pub(crate) type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// WebSocket buffers of the harness's sockets (client and relay alike), sized as the gateway
/// sizes its own: the library's default read buffer (128 KiB) is zeroed before every read,
/// which over a thousand sockets took a quarter of the load generator's CPU.
pub(crate) fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
}

/// A client socket to `url` with `ws_config` and without Nagle's delay.
pub(crate) async fn ws_connect(url: String) -> anyhow::Result<Socket> {
    let (ws, _) = tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true).await?;
    Ok(ws)
}

/// Opens `n` sockets with `f`, 200 at a time.
pub(crate) async fn connect_all<F, Fut>(n: usize, f: F) -> anyhow::Result<Vec<Socket>>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Socket>>,
{
    let mut out = Vec::with_capacity(n);
    let mut at = 0;
    while at < n {
        let end = (at + 200).min(n);
        for s in futures_util::future::join_all((at..end).map(&f)).await {
            out.push(s?);
        }
        at = end;
        if n >= 1000 && at % 1000 == 0 {
            eprintln!("  {at} sockets joined");
        }
    }
    Ok(out)
}

/// Sends a 2.0.0 join and waits for its reply (and, with bindings, the `system` ok).
pub(crate) async fn phoenix_join(
    addr: &str,
    topic: String,
    config: serde_json::Value,
    wait_system: bool,
) -> anyhow::Result<Socket> {
    phoenix_join_as(addr, topic, config, wait_system, None).await
}

/// `phoenix_join` with an `access_token` for the channel.
pub(crate) async fn phoenix_join_as(
    addr: &str,
    topic: String,
    config: serde_json::Value,
    wait_system: bool,
    access_token: Option<String>,
) -> anyhow::Result<Socket> {
    Ok(phoenix_join_answer(addr, topic, config, wait_system, access_token).await?.0)
}

/// `phoenix_join_as`, also returning the frame that answered the join (the `system` ok carries
/// the cursor the bindings went live at).
pub(crate) async fn phoenix_join_answer(
    addr: &str,
    topic: String,
    config: serde_json::Value,
    wait_system: bool,
    access_token: Option<String>,
) -> anyhow::Result<(Socket, String)> {
    let mut ws = ws_connect(format!(
        "ws://{addr}/realtime/v1/websocket?apikey={}&vsn=2.0.0",
        crate::bench::gateway::apikey()
    ))
    .await?;
    let mut payload = json!({"config": config});
    if let Some(t) = access_token {
        payload["access_token"] = t.into();
    }
    let join = json!(["1", "1", topic, "phx_join", payload]);
    ws.send(Message::Text(join.to_string().into())).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ws.next()).await?.transpose()? else {
            break;
        };
        if let Message::Text(t) = msg {
            let system = t.contains("\"system\"");
            if (wait_system && system) || (!wait_system && t.contains("phx_reply")) {
                anyhow::ensure!(t.contains("\"status\":\"ok\""), "join failed: {t}");
                return Ok((ws, t.to_string()));
            }
        }
    }
    anyhow::bail!("join of {topic} not answered within 60 s")
}
