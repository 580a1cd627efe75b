//! Gateways as nodes of one cluster (a real nats-server and Postgres): every node serves every
//! change, a cursor from one node resumes on another, and the slot moves when its owner stops.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cases::sse::{at_least, check_against_ledger, get_json, key_query, Sse, WRITERS};
use crate::support::{exec, fresh_db, pool, wait_for, TestApp};
use walcast::local_nats::LocalNats;

const SCHEMA: &str = "
CREATE TABLE items (id bigint PRIMARY KEY, v text);
CREATE TABLE ledger (seq bigserial PRIMARY KEY, item bigint NOT NULL);
";

/// A private nats-server with JetStream for one test.
pub(super) async fn nats_server(test: &str) -> LocalNats {
    let dir = std::env::temp_dir().join(format!("walcast-nats-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalNats::start(dir).await.expect("starting nats-server (Debian: apt-get install nats-server)")
}

/// Node `name` of the cluster on `nats`, in this process, with its own change log.
async fn node(url: &str, nats: &LocalNats, name: &str) -> TestApp {
    let db = url.rsplit('/').next().unwrap_or("").to_owned();
    let nats_url = nats.url();
    TestApp::spawn_with(url, |c| {
        c.cluster.nats_url = Some(nats_url);
        c.cluster.node_id = Some(name.to_owned());
        c.cluster.lease_secs = 2;
        c.changelog.dir = crate::support::log_dir(&format!("{db}-{name}"));
    })
    .await
}

/// Commits `items` rows (and their `ledger` rows) from `WRITERS` writers until `stop`.
fn writers(
    p: &sqlx::PgPool,
    stop: &Arc<AtomicBool>,
    committed: &Arc<AtomicI64>,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..WRITERS)
        .map(|w| {
            let (p, stop, committed) = (p.clone(), Arc::clone(stop), Arc::clone(committed));
            tokio::spawn(async move {
                let mut id = w;
                while !stop.load(Ordering::Relaxed) {
                    exec(
                        &p,
                        &format!(
                            "INSERT INTO items VALUES ({id}, 'v'); INSERT INTO ledger (item) VALUES ({id})"
                        ),
                    )
                    .await;
                    committed.fetch_add(1, Ordering::Relaxed);
                    id += WRITERS;
                }
            })
        })
        .collect()
}

/// Reads `sse` until it has `want` deliveries in `got`.
async fn read_until(who: &str, sse: &mut Sse, got: &mut Vec<(String, i64)>, want: usize) {
    while got.len() < want {
        let Some((id, event, data)) = sse.next().await else {
            panic!("{who}: {} of {want} received, then 20 s of silence", got.len())
        };
        assert_eq!(event, "insert", "{who}: {data}");
        got.push((id.expect("id"), data["record"]["id"].as_i64().expect("id")));
    }
}

#[tokio::test]
async fn every_node_serves_every_change_and_a_cursor_resumes_on_another_node_across_a_handover() {
    let nats = nats_server("nodes").await;
    let url = fresh_db().await;
    let p = pool(&url).await;
    exec(&p, SCHEMA).await;
    let nodes =
        vec![node(&url, &nats, "a").await, node(&url, &nats, "b").await, node(&url, &nats, "c").await];
    let bases: Vec<String> = nodes.iter().map(|n| format!("http://{}", n.addr)).collect();
    let mut clients = Vec::new();
    for base in &bases {
        clients.push((Sse::open(base, &key_query(), None).await.expect("subscribe"), Vec::new()));
    }

    let (stop, committed) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicI64::new(0)));
    let writing = writers(&p, &stop, &committed);
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        read_until(&format!("client of node {i}"), sse, got, 200).await;
    }

    // The cluster as each node reports it: one owner, three nodes alive.
    let owner = wait_for("an owner, and three nodes alive", Duration::from_secs(30), || async {
        let (_, v) = get_json(&format!("{}/v1/cluster", bases[1])).await;
        let alive = v["nodes"].as_array().map(Vec::len) == Some(3);
        v["owner"].as_str().filter(|_| alive).map(str::to_owned)
    })
    .await;
    let owner_at = ["a", "b", "c"].iter().position(|n| *n == owner).expect("a node's name");
    let metrics = crate::support::http_get(&format!("{}/metrics", bases[owner_at])).await.expect("metrics");
    assert!(metrics.contains("walcast_cluster_slot_owner 1"), "{metrics}");
    let other =
        crate::support::http_get(&format!("{}/metrics", bases[(owner_at + 1) % 3])).await.expect("metrics");
    assert!(other.contains("walcast_cluster_slot_owner 0"), "{other}");

    // The owner stops mid-stream: it releases the lease and another node takes the slot; its
    // client goes on at the next node from its last cursor.
    let mut nodes: Vec<Option<TestApp>> = nodes.into_iter().map(Some).collect();
    nodes[owner_at].take().expect("owner").stop().await;
    let (_, mut moved) = clients.remove(owner_at);
    let next = (owner_at + 1) % 3;
    let last = moved.last().map(|(c, _)| c.clone());
    let mut resumed = Sse::open(&bases[next], &key_query(), last.as_deref()).await.expect("resume elsewhere");
    let down_at = committed.load(Ordering::Relaxed);
    wait_for("writes after the stop", Duration::from_secs(60), at_least(&committed, down_at + 300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writing {
        w.await.expect("writer");
    }
    let ledger: Vec<i64> =
        sqlx::query_scalar("SELECT item FROM ledger ORDER BY seq").fetch_all(&p).await.expect("ledger");
    read_until("the owner's client, moved", &mut resumed, &mut moved, ledger.len()).await;
    check_against_ledger("the owner's client, moved", &moved, &ledger);
    for (i, (sse, got)) in clients.iter_mut().enumerate() {
        let who = format!("client {i} of a surviving node");
        read_until(&who, sse, got, ledger.len()).await;
        check_against_ledger(&who, got, &ledger);
    }
    // Every node hands out the same cursor for the same change.
    assert_eq!(clients[0].1, clients[1].1, "surviving nodes: the same cursors");
    assert_eq!(moved, clients[0].1, "the moved client: the same cursors");
    let (_, v) = get_json(&format!("{}/v1/cluster", bases[next])).await;
    assert!(v["owner"].as_str().is_some_and(|o| o != owner), "the slot moved: {v}");
    for n in nodes.into_iter().flatten() {
        n.stop().await;
    }
}
