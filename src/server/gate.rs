//! [`Gate`]: lets a task that waits on several sources at once poll a source only after that
//! source has signalled. A socket task is woken for every frame its outbox receives; without a
//! gate each of those wake-ups would also poll its socket's read side (a lock, a read attempt
//! into the frame decoder's buffer) and its shutdown and kill tokens (a mutex each), none of which
//! has anything new.
//!
//! Owns: the per-source "woken" flag and the waker the source is polled with. Must not: hold the
//! source itself; the caller polls it through [`Gate::poll`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// One source's gate. A source is polled only with the gate's own waker, so its wake-up is seen
/// by the gate before it reaches the task.
#[derive(Debug)]
pub struct Gate {
    signal: Arc<Signal>,
    waker: Waker,
}

#[derive(Debug)]
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Default for Gate {
    fn default() -> Gate {
        Gate::new()
    }
}

impl Gate {
    /// A gate that lets the first poll through.
    pub fn new() -> Gate {
        let signal = Arc::new(Signal { woken: AtomicBool::new(true), task: AtomicWaker::new() });
        Gate { waker: Waker::from(Arc::clone(&signal)), signal }
    }

    /// Polls the source (`poll_source` with the gate's context) if it has woken since it last
    /// returned `Pending`, or never been polled; otherwise `Pending` at once. The task's waker is
    /// registered first, so a wake-up racing with this call is not lost. A source that returned
    /// `Ready` is polled again next time: it may have more without waking anyone.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        poll_source: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.signal.task.register(cx.waker());
        if !self.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let out = poll_source(&mut Context::from_waker(&self.waker));
        if out.is_ready() {
            self.signal.woken.store(true, Ordering::Release);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Counts how often the task is woken.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_source_is_polled_only_after_it_signalled() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(Arc::clone(&count));
        let mut cx = Context::from_waker(&task);
        let gate = Gate::new();
        let polls = std::cell::Cell::new(0);
        let saved = std::cell::RefCell::new(None::<Waker>);
        let source = |cx: &mut Context<'_>| {
            polls.set(polls.get() + 1);
            *saved.borrow_mut() = Some(cx.waker().clone());
            Poll::<()>::Pending
        };
        assert!(gate.poll(&mut cx, source).is_pending());
        assert!(gate.poll(&mut cx, source).is_pending());
        assert!(gate.poll(&mut cx, source).is_pending());
        assert_eq!(polls.get(), 1, "an unsignalled source is not polled again");
        // The source signals through the waker it was polled with: the task is woken, and the
        // next poll reaches the source.
        saved.borrow_mut().take().unwrap().wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(gate.poll(&mut cx, source).is_pending());
        assert_eq!(polls.get(), 2);
    }

    #[test]
    fn a_ready_source_is_polled_again() {
        let task = Waker::from(Arc::new(Count(AtomicUsize::new(0))));
        let mut cx = Context::from_waker(&task);
        let gate = Gate::new();
        let polls = &std::cell::Cell::new(0);
        let answer = |p: Poll<u8>| {
            move |_: &mut Context<'_>| {
                polls.set(polls.get() + 1);
                p
            }
        };
        assert_eq!(gate.poll(&mut cx, answer(Poll::Ready(7))), Poll::Ready(7));
        assert_eq!(gate.poll(&mut cx, answer(Poll::Pending)), Poll::Pending);
        assert_eq!(gate.poll(&mut cx, answer(Poll::Pending)), Poll::Pending);
        assert_eq!(polls.get(), 2, "polled after Ready, then not again until woken");
    }
}
