//! Taking the locks on the gateway's shared state (the subscription index, the channel
//! registry, gates, caches). A lock is poisoned when a thread panicked while holding it: the
//! state behind it may be half-updated, and going on — skipping a delivery, then acknowledging
//! the commit — could lose changes for good. So a poisoned lock stops the process, after saying
//! so: a supervisor restarts it, and the replication slot replays everything not acknowledged.
//!
//! Owns: that rule, in one place. Must not: be used for locks whose holders never panic by
//! construction and whose state is advisory (there are none today).

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// The guard of `m`; stops the process if it is poisoned.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(poisoned)
}

/// A read guard of `l`; stops the process if it is poisoned.
pub fn read<T>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(poisoned)
}

/// A write guard of `l`; stops the process if it is poisoned.
pub fn write<T>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(poisoned)
}

#[cold]
fn poisoned<G>(_: PoisonError<G>) -> G {
    let message = "a lock on shared state is poisoned (a thread panicked while holding it); \
                   stopping so that a restart replays from the last acknowledged position";
    tracing::error!("{message}");
    eprintln!("walcast: {message}");
    std::process::abort()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process of `a_poisoned_lock_stops_the_process`.
    const CHILD: &str = "WALCAST_POISON_TEST_CHILD";

    #[test]
    fn healthy_locks_are_taken() {
        let m = Mutex::new(1);
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
        let l = RwLock::new(vec![1]);
        write(&l).push(2);
        assert_eq!(*read(&l), [1, 2]);
    }

    /// The test binary runs this test again as a child that poisons a lock and takes it: the
    /// child must die by SIGABRT, having said why, rather than go on.
    #[test]
    fn a_poisoned_lock_stops_the_process() {
        if std::env::var_os(CHILD).is_some() {
            let m = std::sync::Arc::new(Mutex::new(0));
            let held = std::sync::Arc::clone(&m);
            let _ = std::thread::spawn(move || {
                let _guard = held.lock();
                panic!("poisoning on purpose");
            })
            .join();
            let _guard = lock(&m);
            // Not reached: the process is stopped above.
            std::process::exit(0);
        }
        let exe = std::env::current_exe().expect("test binary");
        let out = std::process::Command::new(exe)
            .args(["--exact", "locks::tests::a_poisoned_lock_stops_the_process", "--nocapture"])
            .env(CHILD, "1")
            .output()
            .expect("child");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(6), "{:?}", out.status);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("a lock on shared state is poisoned"), "{stderr}");
    }
}
