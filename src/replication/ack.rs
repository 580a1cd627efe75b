//! The acknowledgement: the position up to which everything handed on is safe to forget —
//! today, dispatched to subscribers. The replication task confirms it to Postgres as the flush
//! position. Shared by `serve`, `tail` and `bench`.
//!
//! Owns: monotonicity (it never moves back) and observability (a `watch` for waiters). Must not:
//! be advanced on receipt of a change — only once its commit has passed the boundary.

use std::sync::Arc;

use tokio::sync::watch;

use crate::replication::lsn::Lsn;

/// A monotonic LSN watermark. Cheap to clone; all clones share one position.
#[derive(Debug, Clone)]
pub struct Acknowledgement {
    tx: Arc<watch::Sender<Lsn>>,
}

impl Default for Acknowledgement {
    fn default() -> Self {
        Acknowledgement::new()
    }
}

impl Acknowledgement {
    pub fn new() -> Self {
        Acknowledgement { tx: Arc::new(watch::Sender::new(Lsn::ZERO)) }
    }

    /// Moves the position to `lsn` if that is further; never moves it back.
    pub fn advance(&self, lsn: Lsn) {
        self.tx.send_if_modified(|cur| {
            if lsn > *cur {
                *cur = lsn;
                true
            } else {
                false
            }
        });
    }

    /// The current position.
    pub fn get(&self) -> Lsn {
        *self.tx.borrow()
    }

    /// Observes the position.
    pub fn watch(&self) -> watch::Receiver<Lsn> {
        self.tx.subscribe()
    }
}

/// Keeps `out` at the lower of `a` and `b` until `shutdown`: the position both stages are done
/// with (a cluster's owner confirms what the stream stored and its own log synced).
pub async fn follow_lower(
    out: Acknowledgement,
    a: Acknowledgement,
    b: Acknowledgement,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let (mut wa, mut wb) = (a.watch(), b.watch());
    loop {
        out.advance((*wa.borrow_and_update()).min(*wb.borrow_and_update()));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return,
            r = wa.changed() => if r.is_err() { return },
            r = wb.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn monotonic_and_observable() {
        let a = Acknowledgement::new();
        let mut w = a.watch();
        a.advance(Lsn(10));
        a.clone().advance(Lsn(5));
        assert_eq!(a.get(), Lsn(10));
        w.changed().await.unwrap();
        assert_eq!(*w.borrow_and_update(), Lsn(10));
        a.advance(Lsn(10));
        assert!(!w.has_changed().unwrap(), "no change notification without progress");
        a.advance(Lsn(11));
        assert!(w.has_changed().unwrap());
    }

    #[tokio::test]
    async fn the_lower_of_two_is_followed() {
        let (out, a, b) = (Acknowledgement::new(), Acknowledgement::new(), Acknowledgement::new());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(follow_lower(out.clone(), a.clone(), b.clone(), stop.clone()));
        let mut w = out.watch();
        a.advance(Lsn(30));
        b.advance(Lsn(20));
        w.wait_for(|l| *l == Lsn(20)).await.unwrap();
        b.advance(Lsn(50));
        w.wait_for(|l| *l == Lsn(30)).await.unwrap();
        a.advance(Lsn(40));
        w.wait_for(|l| *l == Lsn(40)).await.unwrap();
        stop.cancel();
        task.await.unwrap();
        assert_eq!(out.get(), Lsn(40));
    }
}
