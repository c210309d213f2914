//! Deadlines for idle connections without a timer each. A connection that waits for its next
//! request parks here with its deadline; one task sweeps the queue a few times a second and
//! wakes those whose time is up. An idle connection then costs a small shared flag and a
//! heap entry, where a runtime timer (cache-line aligned, close to 1 KiB) would cost more
//! than the rest of the connection. Deadlines are met within `SWEEP` late at most.
//!
//! A connection that wakes up earlier simply drops its `Parked`; its entry stays in the heap
//! until it is swept or compacted (when dead entries outnumber live ones).

use std::cell::{Cell, RefCell};
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How often the queue is swept: how late an idle connection may close.
pub const SWEEP: Duration = Duration::from_millis(250);

#[derive(Default)]
struct Flag {
    expired: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

struct Entry {
    deadline: Instant,
    flag: Rc<Flag>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.deadline == other.deadline
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        self.deadline.cmp(&other.deadline)
    }
}

#[derive(Default)]
pub struct IdleQueue {
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    /// `Parked` values alive: the entries that still matter.
    live: Rc<Cell<usize>>,
}

impl IdleQueue {
    /// A future that completes once `deadline` has passed (at the next sweep after it).
    pub fn park(&self, deadline: Instant) -> Parked {
        let flag = Rc::new(Flag::default());
        let mut heap = self.heap.borrow_mut();
        let live = self.live.get() + 1;
        self.live.set(live);
        if heap.len() >= 1024 && heap.len() > 2 * live {
            heap.retain(|Reverse(e)| Rc::strong_count(&e.flag) > 1);
        }
        heap.push(Reverse(Entry {
            deadline,
            flag: flag.clone(),
        }));
        Parked {
            flag,
            live: self.live.clone(),
        }
    }

    /// Wakes every connection whose deadline is at or before `now`.
    pub fn sweep(&self, now: Instant) {
        let mut due = Vec::new();
        {
            let mut heap = self.heap.borrow_mut();
            while heap.peek().is_some_and(|Reverse(e)| e.deadline <= now) {
                if let Some(Reverse(e)) = heap.pop() {
                    due.push(e.flag);
                }
            }
        }
        // Woken outside the borrow: a woken task may park again at once.
        for flag in due {
            flag.expired.set(true);
            if let Some(w) = flag.waker.borrow_mut().take() {
                w.wake();
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.heap.borrow().len()
    }
}

pub struct Parked {
    flag: Rc<Flag>,
    live: Rc<Cell<usize>>,
}

impl Future for Parked {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.flag.expired.get() {
            return Poll::Ready(());
        }
        let mut waker = self.flag.waker.borrow_mut();
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Parked {
    fn drop(&mut self) {
        self.live.set(self.live.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn poll_once(p: &mut Parked) -> bool {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        Pin::new(p).poll(&mut cx).is_ready()
    }

    #[test]
    fn a_sweep_wakes_exactly_the_expired() {
        let q = IdleQueue::default();
        let t0 = Instant::now();
        let mut early = q.park(t0 + Duration::from_secs(1));
        let mut late = q.park(t0 + Duration::from_secs(5));
        assert!(!poll_once(&mut early) && !poll_once(&mut late));
        q.sweep(t0 + Duration::from_secs(2));
        assert!(poll_once(&mut early), "past its deadline");
        assert!(!poll_once(&mut late), "not yet");
        q.sweep(t0 + Duration::from_secs(5));
        assert!(poll_once(&mut late));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn dropped_waits_are_compacted_away() {
        let q = IdleQueue::default();
        let t0 = Instant::now() + Duration::from_secs(60);
        for i in 0..10_000u64 {
            // Each connection woke before its deadline: only its entry is left behind.
            drop(q.park(t0 + Duration::from_millis(i)));
        }
        let kept = q.park(t0);
        assert!(
            q.len() <= 1025,
            "{} entries kept for one live wait",
            q.len()
        );
        drop(kept);
    }
}
