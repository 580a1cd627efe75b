//! The raw-WebSocket baseline: a minimal pub-sub relay on tokio-tungstenite with no protocol, no
//! matching and no encoding — a client connects to `/?group=G`, and every text or binary message
//! it sends is written to every other client of group G (frames shared by reference count, written
//! in batches as the gateway does). The relay's first message to a client, `ready`, says it is a
//! member; a completed handshake alone does not. Run as a child process (`walcast bench relay`) so
//! its CPU is apart from the load generator's, like the gateway's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

/// The first message of every connection, sent once the client is a member of its group.
pub const READY: &str = "ready";

type Groups = Arc<Mutex<HashMap<String, Vec<(u64, mpsc::Sender<Message>)>>>>;

/// Serves until the process is killed.
pub async fn serve(listen: &str) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    println!("relay listening on {}", listener.local_addr()?);
    let groups: Groups = Arc::default();
    let mut next = 0u64;
    loop {
        let (tcp, _) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        next += 1;
        let id = next;
        let groups = Arc::clone(&groups);
        tokio::spawn(async move {
            let mut group = String::new();
            #[allow(clippy::result_large_err)] // the callback's signature is the library's
            let pick_group = |req: &Request, resp: Response| {
                group = req.uri().query().and_then(|q| q.strip_prefix("group=")).unwrap_or("").to_owned();
                Ok(resp)
            };
            let ws = tokio_tungstenite::accept_hdr_async_with_config(
                tcp,
                pick_group,
                Some(crate::bench::client::ws_config()),
            )
            .await;
            let Ok(ws) = ws else { return };
            let (mut sink, mut stream) = ws.split();
            let (tx, mut rx) = mpsc::channel::<Message>(4096);
            if let Ok(mut g) = groups.lock() {
                g.entry(group.clone()).or_default().push((id, tx));
            }
            // Tells the client it is a member now: a handshake alone can complete before that.
            if sink.send(Message::text(READY)).await.is_err() {
                return;
            }
            let writer = tokio::spawn(async move {
                while let Some(m) = rx.recv().await {
                    let mut ok = sink.feed(m).await.is_ok();
                    let mut n = 1;
                    while ok && n < 64 {
                        let Ok(more) = rx.try_recv() else { break };
                        ok = sink.feed(more).await.is_ok();
                        n += 1;
                    }
                    if !ok || sink.flush().await.is_err() {
                        break;
                    }
                }
            });
            while let Some(Ok(m)) = stream.next().await {
                if !(m.is_text() || m.is_binary()) {
                    continue;
                }
                let Ok(g) = groups.lock() else { break };
                for (other, tx) in g.get(&group).map(Vec::as_slice).unwrap_or_default() {
                    if *other != id {
                        let _ = tx.try_send(m.clone());
                    }
                }
            }
            if let Ok(mut g) = groups.lock() {
                if let Some(members) = g.get_mut(&group) {
                    members.retain(|(other, _)| *other != id);
                }
            }
            writer.abort();
        });
    }
}
