//! The cluster's parts against a real `nats-server` (JetStream) started for each test.

use std::time::{Duration, Instant};

use walcast::cluster::lease::{Holder, Lease, RenewError};
use walcast::cluster::Nats;
use walcast::config::ClusterConfig;
use walcast::local_nats::LocalNats;

/// A private nats-server with JetStream for one test.
async fn nats_server(test: &str) -> LocalNats {
    let dir = std::env::temp_dir().join(format!("walcast-nats-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    LocalNats::start(dir).await.expect("starting nats-server (Debian: apt-get install nats-server)")
}

async fn node(server: &LocalNats, id: &str) -> Nats {
    let config = ClusterConfig { nats_url: Some(server.url()), ..ClusterConfig::default() };
    Nats::connect(&config, id).await.expect("connect to nats")
}

async fn lease(server: &LocalNats, id: &str, ttl: Duration) -> Lease {
    Lease::open(&node(server, id).await, "s1", id, ttl).await.expect("open the lease")
}

#[tokio::test]
async fn one_node_holds_the_slot_lease_and_another_takes_it_only_after_it_lapses() {
    let server = nats_server("lease").await;
    // Long enough that a loaded machine does not stall a renewal past it.
    let ttl = Duration::from_secs(4);
    let (a, b, c) =
        (lease(&server, "a", ttl).await, lease(&server, "b", ttl).await, lease(&server, "c", ttl).await);
    let (mut seen_a, mut seen_b, mut seen_c) = (None, None, None);

    let mut held = a.try_take(&mut seen_a).await.expect("try").expect("a vacant lease is taken");
    assert_eq!(b.holder().await.unwrap(), Holder::Node { node: "a".into(), revision: held.revision });

    // While `a` renews (the owner does every third of the lease), nobody else takes it, for
    // well over a lease's time.
    let until = Instant::now() + ttl * 2;
    let mut renewed = Instant::now();
    while Instant::now() < until {
        renewed = Instant::now();
        a.renew(&mut held).await.expect("the holder renews");
        assert!(held.valid(ttl));
        assert_eq!(b.try_take(&mut seen_b).await.unwrap(), None, "taken while renewed");
        assert_eq!(c.try_take(&mut seen_c).await.unwrap(), None, "taken while renewed");
        tokio::time::sleep(ttl / 4).await;
    }

    // `a` stops renewing: `b` and `c` try together until one has it; never both.
    let deadline = Instant::now() + ttl + Duration::from_secs(5);
    let (winner, loser, mut won) = loop {
        let (rb, rc) = tokio::join!(b.try_take(&mut seen_b), c.try_take(&mut seen_c));
        match (rb.unwrap(), rc.unwrap()) {
            (Some(_), Some(_)) => panic!("two nodes took the lease at once"),
            (Some(h), None) => break (&b, &c, h),
            (None, Some(h)) => break (&c, &b, h),
            (None, None) => {}
        }
        assert!(
            Instant::now() < deadline,
            "the lapsed lease was not taken within {:?}",
            ttl + Duration::from_secs(5)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Not before a whole lease since the last renewal was sent.
    assert!(renewed.elapsed() >= ttl, "taken {:?} after the last renewal", renewed.elapsed());
    // Fencing: by the time another node has the lease, the old holder no longer counts itself
    // the owner, and its renewal fails for good.
    assert!(!held.valid(ttl), "the old holder still counts its lease valid");
    assert!(matches!(a.renew(&mut held).await, Err(RenewError::Lost)));
    let mut seen_l = None;
    assert_eq!(loser.try_take(&mut seen_l).await.unwrap(), None);
    assert!(won.revision > held.revision);

    // The lease is kept in JetStream's store: it survives a restart of the server.
    let mut server = server;
    server.restart().await.expect("restart nats-server");
    let deadline = Instant::now() + Duration::from_secs(15);
    while let Err(e) = winner.renew(&mut won).await {
        assert!(matches!(e, RenewError::Unreachable(_)), "after the restart: {e}");
        assert!(Instant::now() < deadline, "the winner could not renew after the restart: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        a.holder().await.unwrap(),
        Holder::Node { node: winner.node().into(), revision: won.revision }
    );

    // A clean stop gives the lease up: the next node takes it at once, not a lease later.
    winner.release(won).await.expect("release");
    let mut seen = None;
    let again = a.try_take(&mut seen).await.unwrap();
    assert!(again.is_some(), "a released lease is taken at once");
}

/// One transaction of `rows` inserts into a one-column table, as the walsender task hands them on.
fn transaction(lsn: u64, rows: u32) -> Vec<walcast::change::ChangeEvent> {
    use std::sync::Arc;
    use walcast::change::{Change, ChangeEvent, ChangeKind, Column, Relation, ReplicaIdentity};
    use walcast::replication::lsn::Lsn;
    use walcast::replication::pgoutput::{Tuple, Value};
    let catalog = walcast::replication::values::TypeCatalog::default();
    let ty = Arc::clone(catalog.get(20).expect("int8"));
    let column = Column { name: "id".into(), ty, is_key: true, in_primary_key: true };
    let relation = Arc::new(Relation::new(16384, "public", "t", ReplicaIdentity::Default, vec![column]));
    let mut events: Vec<ChangeEvent> = (0..rows)
        .map(|seq| {
            ChangeEvent::Change(Change {
                relation: Arc::clone(&relation),
                kind: ChangeKind::Insert,
                new: Some(Tuple(vec![Value::Text(format!("{}", lsn * 1000 + u64::from(seq)).into())])),
                old: None,
                commit_lsn: Lsn(lsn),
                commit_ts: 0,
                seq,
                xid: lsn as u32,
                snapshot: false,
            })
        })
        .collect();
    events.push(ChangeEvent::Commit { commit_lsn: Lsn(lsn), end_lsn: Lsn(lsn + 8) });
    events
}

fn chunk_of(events: &[walcast::change::ChangeEvent]) -> walcast::cluster::chunk::Chunk {
    let mut builder = walcast::cluster::chunk::ChunkBuilder::default();
    for e in events {
        builder.push(e);
    }
    builder.finish()
}

/// What a node reads back: each change's cursor and transaction id, and each commit.
fn ledger(events: &[walcast::change::ChangeEvent]) -> Vec<String> {
    use walcast::change::ChangeEvent;
    events
        .iter()
        .map(|e| match e {
            ChangeEvent::Change(c) => format!("{} xid {}", c.cursor(), c.xid),
            ChangeEvent::Broadcast(b) => format!("broadcast {:?}", b.position),
            ChangeEvent::Commit { commit_lsn, end_lsn } => format!("commit {commit_lsn} {end_lsn}"),
        })
        .collect()
}

#[tokio::test]
async fn a_stale_owner_cannot_append_after_a_new_one_and_every_node_reads_the_chunks_in_order() {
    use futures_util::StreamExt;
    use walcast::cluster::stream::{ChangeStream, StreamError};

    let server = nats_server("stream").await;
    let (a, b) = (node(&server, "a").await, node(&server, "b").await);
    let stream_a = ChangeStream::open(&a).await.expect("open");
    let stream_b = ChangeStream::open(&b).await.expect("open again");
    assert_eq!(stream_a.last().await.unwrap(), None, "a new stream is empty");

    // Owner a appends two transactions.
    let (t1, t2, t3) = (transaction(0x100, 3), transaction(0x200, 1), transaction(0x300, 2));
    let mut owner_a = stream_a.appender(0, None);
    assert_eq!(stream_a.append(&mut owner_a, &chunk_of(&t1)).await.unwrap(), 1);
    assert_eq!(stream_a.append(&mut owner_a, &chunk_of(&t2)).await.unwrap(), 2);

    // Owner b takes over: it starts after the stream's last message, whose position it reads.
    let (last, through) = stream_b.last().await.unwrap().expect("the stream holds two chunks");
    assert_eq!(last, 2);
    assert_eq!(through, walcast::change::Position::end_of(walcast::replication::lsn::Lsn(0x200)));
    let mut owner_b = stream_b.appender(last, Some(through));
    assert_eq!(stream_b.append(&mut owner_b, &chunk_of(&t3)).await.unwrap(), 3);

    // The stale owner's next append is refused, and stores nothing.
    let stale = stream_a.append(&mut owner_a, &chunk_of(&transaction(0x400, 1))).await;
    assert!(matches!(stale, Err(StreamError::Fenced { expected: 2, .. })), "{stale:?}");
    assert_eq!(stream_a.last().await.unwrap().map(|(s, _)| s), Some(3));

    // Two owners both appending from the stream's end, one with chunks in flight: once the
    // other's message is in, none of the first one's lands — not even one whose expected
    // sequence matches again (it expects the id of the message it sent before, too).
    let tail = stream_b.tail().await.unwrap();
    let (last, through) = (tail.sequence, tail.through);
    let mut quick = stream_b.appender(last, through).after_id(tail.last_id.clone());
    let mut pipelined = stream_a.appender(last, through).after_id(tail.last_id);
    assert_eq!(stream_b.append(&mut quick, &chunk_of(&transaction(0x500, 1))).await.unwrap(), 4);
    let first = stream_a.send(&mut pipelined, &chunk_of(&transaction(0x600, 1))).await.expect("sent");
    let second = stream_a.send(&mut pipelined, &chunk_of(&transaction(0x700, 1))).await.expect("sent");
    assert!(matches!(stream_a.confirm(&mut pipelined, first).await, Err(StreamError::Fenced { .. })));
    assert!(matches!(stream_a.confirm(&mut pipelined, second).await, Err(StreamError::Fenced { .. })));
    assert_eq!(stream_a.last().await.unwrap().map(|(s, _)| s), Some(4), "an interleaved append landed");
    let t5 = transaction(0x500, 1);

    // Every node reads the chunks in order, from any sequence, with the transactions' ids.
    let want: Vec<String> = [ledger(&t1), ledger(&t2), ledger(&t3), ledger(&t5)].concat();
    let mut read = Vec::new();
    let mut from_start = Box::pin(stream_b.read_from(1).await.expect("read"));
    while read.len() < want.len() {
        let next = tokio::time::timeout(Duration::from_secs(10), from_start.next()).await;
        let chunk = next.expect("a chunk within 10 s").expect("not ended").expect("readable");
        read.extend(ledger(&chunk.events));
    }
    assert_eq!(read, want);
    let mut from_two = Box::pin(stream_a.read_from(2).await.expect("read"));
    let chunk = from_two.next().await.expect("not ended").expect("readable");
    assert_eq!((chunk.sequence, ledger(&chunk.events)), (2, ledger(&t2)));
}

/// Runs the owner's publishing loop over `events` from `start`; returns its result.
async fn publish_all(
    stream: &walcast::cluster::stream::ChangeStream,
    start: walcast::cluster::stream::Tail,
    events: Vec<walcast::change::ChangeEvent>,
    ack: &walcast::replication::ack::Acknowledgement,
) -> Result<(), walcast::cluster::stream::StreamError> {
    publish_while(stream, start, events, ack, &|| true).await
}

/// `publish_all`, asking `may_append` before each append as an owner asks its lease.
async fn publish_while(
    stream: &walcast::cluster::stream::ChangeStream,
    start: walcast::cluster::stream::Tail,
    events: Vec<walcast::change::ChangeEvent>,
    ack: &walcast::replication::ack::Acknowledgement,
    may_append: &(dyn Fn() -> bool + Sync),
) -> Result<(), walcast::cluster::stream::StreamError> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let feed = async move {
        for e in events {
            if tx.send(e).await.is_err() {
                break;
            }
        }
    };
    let (_, result) =
        tokio::join!(feed, walcast::cluster::publish::publish(stream, start, rx, ack, may_append));
    result
}

/// Every event of the stream from its first message, as a ledger; each chunk's count of the
/// stream's changes through it is checked against the changes read.
async fn stream_ledger(stream: &walcast::cluster::stream::ChangeStream, want: usize) -> Vec<String> {
    use futures_util::StreamExt;
    let (mut read, mut changes) = (Vec::new(), 0);
    let mut chunks = Box::pin(stream.read_from(1).await.expect("read"));
    while read.len() < want {
        let next = tokio::time::timeout(Duration::from_secs(10), chunks.next()).await;
        let chunk = next.expect("a chunk within 10 s").expect("not ended").expect("readable");
        changes +=
            chunk.events.iter().filter(|e| matches!(e, walcast::change::ChangeEvent::Change(_))).count();
        assert_eq!(chunk.changes, Some(changes as u64), "the count through chunk {}", chunk.sequence);
        read.extend(ledger(&chunk.events));
    }
    read
}

#[tokio::test]
async fn the_owner_publishes_transactions_once_across_a_takeover_and_confirms_only_what_is_stored() {
    use walcast::cluster::stream::{ChangeStream, StreamError};
    use walcast::replication::ack::Acknowledgement;
    use walcast::replication::lsn::Lsn;

    let server = nats_server("publish").await;
    let stream = ChangeStream::open(&node(&server, "a").await).await.expect("open");
    // A transaction of 20,000 rows is several chunks of at most 256 KiB.
    let (t1, big, t3, t4) =
        (transaction(0x100, 2), transaction(0x200, 20_000), transaction(0x300, 1), transaction(0x400, 3));
    let mut want = [ledger(&t1), ledger(&big), ledger(&t3)].concat();

    let ack_a = Acknowledgement::new();
    let events: Vec<_> = [transaction(0x100, 2), transaction(0x200, 20_000), transaction(0x300, 1)]
        .into_iter()
        .flatten()
        .collect();
    publish_all(&stream, stream.tail().await.unwrap(), events, &ack_a).await.expect("owner a publishes");
    assert_eq!(ack_a.get(), Lsn(0x308), "confirmed up to the last stored commit");
    let (after_a, _) = stream.last().await.unwrap().expect("chunks");
    assert!(after_a >= 4, "the large transaction spans chunks ({after_a} messages)");

    // Owner b replays the slot from before what a stored (t1 was confirmed, the rest was not
    // yet when a went away), then a new transaction: only the new one is appended, and what it
    // skipped is confirmed since it is stored.
    let ack_b = Acknowledgement::new();
    let start = stream.tail().await.unwrap();
    let replay: Vec<_> = [big, t3, transaction(0x400, 3)].into_iter().flatten().collect();
    publish_all(&stream, start, replay, &ack_b).await.expect("owner b publishes");
    assert_eq!(ack_b.get(), Lsn(0x408));
    want.extend(ledger(&t4));
    assert_eq!(stream_ledger(&stream, want.len()).await, want, "every event once, in order");
    // The stream counts its changes across owners: 2 + 20,000 + 1 by a, 3 by b.
    assert_eq!(stream.tail().await.unwrap().changes, 20_006);

    // Owner a, gone stale (it still thinks the stream ends where it left it), cannot append.
    let stale = walcast::cluster::stream::Tail {
        sequence: after_a,
        through: Some(walcast::change::Position::end_of(Lsn(0x300))),
        last_id: None,
        changes: 0,
    };
    let ack_stale = Acknowledgement::new();
    let result = publish_all(&stream, stale, transaction(0x500, 1), &ack_stale).await;
    assert!(matches!(result, Err(StreamError::Fenced { .. })), "{result:?}");
    assert_eq!(ack_stale.get(), Lsn::ZERO, "a fenced owner confirms nothing");
    assert_eq!(stream.last().await.unwrap().map(|(_, p)| p.lsn), Some(Lsn(0x400)));

    // An owner whose lease ran out by its own clock appends nothing, even where the stream
    // would take it; what is already stored it may still confirm.
    let ack_late = Acknowledgement::new();
    let start = stream.tail().await.unwrap();
    let late: Vec<_> = [transaction(0x400, 3), transaction(0x500, 1)].into_iter().flatten().collect();
    let result = publish_while(&stream, start, late, &ack_late, &|| false).await;
    assert!(matches!(result, Err(StreamError::LeaseEnded { .. })), "{result:?}");
    assert_eq!(ack_late.get(), Lsn(0x408), "only what was stored is confirmed");
    assert_eq!(stream.last().await.unwrap().map(|(_, p)| p.lsn), Some(Lsn(0x400)));
}

/// The first `n` events a node reading after `after` is handed, as a ledger.
async fn consumed(
    stream: &walcast::cluster::stream::ChangeStream,
    after: walcast::change::Position,
    n: usize,
) -> Vec<String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let reader = stream.clone();
    let task = tokio::spawn(async move {
        walcast::cluster::consume::consume(&reader, after, &tx, &Default::default()).await
    });
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(e)) => got.extend(ledger(&[e])),
            Ok(None) => panic!("the reader stopped: {:?}", task.await),
            Err(_) => panic!("only {} of {n} events within 10 s", got.len()),
        }
    }
    task.abort();
    got
}

#[tokio::test]
async fn a_node_reads_every_event_after_its_position_from_any_chunk_and_is_told_when_the_stream_lost_it() {
    use walcast::change::Position;
    use walcast::cluster::stream::{ChangeStream, StreamError};
    use walcast::replication::ack::Acknowledgement;
    use walcast::replication::lsn::Lsn;

    let server = nats_server("consume").await;
    let stream = ChangeStream::open(&node(&server, "a").await).await.expect("open");
    let all: Vec<_> =
        [transaction(0x100, 2), transaction(0x200, 20_000), transaction(0x300, 1), transaction(0x400, 3)]
            .into_iter()
            .flatten()
            .collect();
    let full = ledger(&all);
    publish_all(&stream, walcast::cluster::stream::Tail::default(), all, &Acknowledgement::new())
        .await
        .expect("publish");
    let at = |p: Position| {
        full.iter().position(|l| l.starts_with(&format!("{:016X}{:08X}", p.lsn.0, p.seq))).unwrap()
    };

    // From nothing, from a commit, and from the middle of a transaction that spans chunks.
    assert_eq!(consumed(&stream, Position::ZERO, full.len()).await, full);
    let after_t1 = 3;
    assert_eq!(
        consumed(&stream, Position::end_of(Lsn(0x100)), full.len() - after_t1).await,
        full[after_t1..]
    );
    let middle = Position { lsn: Lsn(0x200), seq: 12_345 };
    let from = at(middle) + 1;
    assert_eq!(consumed(&stream, middle, full.len() - from).await, full[from..]);

    // Caught up, a node is handed what is published next.
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    let reader = stream.clone();
    let live = tokio::spawn(async move {
        walcast::cluster::consume::consume(&reader, Position::end_of(Lsn(0x400)), &tx, &Default::default())
            .await
    });
    let next = transaction(0x500, 1);
    let want = ledger(&next);
    publish_all(&stream, stream.tail().await.unwrap(), next, &Acknowledgement::new()).await.expect("publish");
    let mut got = Vec::new();
    while got.len() < want.len() {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("within 10 s")
            .expect("open");
        got.extend(ledger(&[e]));
    }
    assert_eq!(got, want);
    live.abort();

    // The stream's retention passes a node's position: it is told, never handed a later event.
    let first_kept = stream.sequence_after(Position::end_of(Lsn(0x200))).await.expect("t3's chunk");
    stream.purge_before(first_kept).await.expect("purge");
    let lost = stream.sequence_after(Position::end_of(Lsn(0x100))).await;
    assert!(matches!(lost, Err(StreamError::Behind { .. })), "{lost:?}");
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let (_, result) =
        walcast::cluster::consume::consume(&stream, Position::end_of(Lsn(0x100)), &tx, &Default::default())
            .await;
    assert!(matches!(result, Err(StreamError::Behind { .. })), "{result:?}");
    // A position the kept messages follow on from is still fine.
    assert_eq!(stream.sequence_after(Position::end_of(Lsn(0x200))).await.unwrap(), first_kept);
    let begins = stream.begins_after().await.unwrap().expect("not empty");
    assert!(begins > Position::end_of(Lsn(0x100)) && begins <= Position::end_of(Lsn(0x200)), "{begins:?}");

    // Trimming by age keeps the last chunk, whose position the next owner starts from.
    let (last, through) = stream.end().await.unwrap();
    assert_eq!(stream.trim(Duration::from_secs(3600)).await.unwrap(), 0, "nothing is an hour old");
    assert!(stream.trim(Duration::ZERO).await.unwrap() > 0);
    assert_eq!(stream.end().await.unwrap(), (last, through));
    assert_eq!(stream.sequence_after(Position::end_of(Lsn(0x400))).await.unwrap(), last);
    assert_eq!(stream.trim(Duration::ZERO).await.unwrap(), 0);
}

#[tokio::test]
async fn nodes_holding_the_lease_over_time_have_one_owner_at_most_and_hand_over_on_loss_or_stop() {
    use tokio_util::sync::CancellationToken;
    use walcast::cluster::owner::hold;

    let server = nats_server("owner").await;
    let ttl = Duration::from_secs(3);
    let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
    let (owns_a, task_a) = hold(lease(&server, "a", ttl).await, stop_a.clone());
    let (owns_b, task_b) = hold(lease(&server, "b", ttl).await, stop_b.clone());
    let both =
        |a: &walcast::cluster::owner::Ownership, b: &walcast::cluster::owner::Ownership| (a.now(), b.now());

    // One of them takes the slot; for two leases' time it keeps it, and never both own it.
    let deadline = Instant::now() + ttl * 3;
    while both(&owns_a, &owns_b) == (false, false) {
        assert!(Instant::now() < deadline, "no node took the lease");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = both(&owns_a, &owns_b);
    let until = Instant::now() + ttl * 2;
    while Instant::now() < until {
        assert_eq!(both(&owns_a, &owns_b), first, "ownership moved while its holder renewed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (owner_task, dead, mut other, stop_other) =
        if first.0 { (task_a, owns_a, owns_b, stop_b) } else { (task_b, owns_b, owns_a, stop_a) };

    // The owner's process dies (its task is gone, the lease is not released): the other node
    // owns the slot once the lease lapses, not before.
    owner_task.abort();
    let died = Instant::now();
    tokio::time::timeout(ttl + Duration::from_secs(5), other.wait_for(true)).await.expect("taken over").ok();
    // The dead holder's last word (its watch) still says it owns the slot; its own clock says
    // it may no longer act, by the time another node has taken over.
    assert!(dead.seen() && !dead.now(), "a node whose lease lapsed may still act");
    // It renewed at most a third of a lease before it died, and its lease lapses a whole lease
    // after that renewal: so not sooner than two thirds of a lease after the death.
    assert!(died.elapsed() >= ttl / 2, "taken over {:?} after the owner died", died.elapsed());

    // A clean stop hands over at once: a new node waiting beside it takes the lease well
    // within a lease's time.
    let stop_c = CancellationToken::new();
    let (mut owns_c, task_c) = hold(lease(&server, "c", ttl).await, stop_c.clone());
    let stopped = Instant::now();
    stop_other.cancel();
    tokio::time::timeout(ttl * 2, owns_c.wait_for(true)).await.expect("handed over").ok();
    assert!(stopped.elapsed() < ttl, "a released lease took {:?} to move", stopped.elapsed());
    assert!(!other.now() && !other.seen(), "the stopped node still owns the slot");
    stop_c.cancel();
    let _ = task_c.await;
}

#[tokio::test]
async fn chunks_larger_than_a_message_go_in_parts_that_readers_join_and_drop_when_left_unfinished() {
    use walcast::change::Position;
    use walcast::cluster::stream::{position_text, ChangeStream, AFTER, PART, THROUGH};
    use walcast::replication::ack::Acknowledgement;
    use walcast::replication::lsn::Lsn;

    let server = nats_server("parts").await;
    let nats = node(&server, "a").await;
    let stream = ChangeStream::open(&nats).await.expect("open").with_part_bytes(4096);
    let first: Vec<_> = [transaction(0x100, 2), transaction(0x200, 2_000), transaction(0x300, 1)]
        .into_iter()
        .flatten()
        .collect();
    let mut full = ledger(&first);
    let ack = Acknowledgement::new();
    publish_all(&stream, stream.tail().await.unwrap(), first, &ack).await.expect("publish");
    assert_eq!(ack.get(), Lsn(0x308));
    let (messages, _) = stream.end().await.unwrap();
    assert!(messages > 10, "2,000 rows in parts of 4 KiB: {messages} messages");
    assert_eq!(consumed(&stream, Position::ZERO, full.len()).await, full);
    let middle = Position { lsn: Lsn(0x200), seq: 1_234 };
    let from = full.iter().position(|l| l.starts_with(&position_text(middle))).unwrap() + 1;
    assert_eq!(consumed(&stream, middle, full.len() - from).await, full[from..]);

    // An owner that died between the parts of a chunk left them unfinished: they carry the
    // previous chunk's position, so the next owner appends the chunk again, and readers drop
    // the unfinished parts.
    let (last, through) = stream.end().await.unwrap();
    let through = position_text(through.expect("a position"));
    let mut expected = last;
    for part in ["1/3", "2/3"] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(THROUGH, through.as_str());
        headers.insert(AFTER, through.as_str());
        headers.insert(PART, part);
        headers.insert("Nats-Expected-Last-Sequence", expected.to_string().as_str());
        let ack = nats
            .jetstream
            .publish_with_headers("walcast.changes", headers, "unfinished".into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        expected = ack.sequence;
    }
    let start = stream.tail().await.unwrap();
    assert_eq!(start.through, Some(Position::end_of(Lsn(0x300))), "unfinished parts do not count");
    let big = transaction(0x400, 2_000);
    full.extend(ledger(&big));
    publish_all(&stream, start, big, &Acknowledgement::new()).await.expect("the next owner publishes");
    assert_eq!(consumed(&stream, Position::ZERO, full.len()).await, full);
    let after_t3 = full.iter().position(|l| l.starts_with("commit 0/300")).unwrap() + 1;
    assert_eq!(
        consumed(&stream, Position::end_of(Lsn(0x300)), full.len() - after_t3).await,
        full[after_t3..]
    );

    // Trimming keeps every part of the last chunk.
    assert!(stream.trim(Duration::ZERO).await.unwrap() > 0);
    assert_eq!(stream.begins_after().await.unwrap(), Some(Position::end_of(Lsn(0x300))));
    assert_eq!(
        consumed(&stream, Position::end_of(Lsn(0x300)), full.len() - after_t3).await,
        full[after_t3..]
    );
}
