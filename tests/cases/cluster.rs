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
