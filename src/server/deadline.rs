//! The route deadline of the request in flight on an HTTP/1 caller connection,
//! kept by the connection rather than by a timer per request.
//!
//! A tokio timer per request takes the timer wheel's lock twice (registering on
//! the first poll, deregistering on drop), on the request path. HTTP/1 serves one request at a time per connection,
//! on the connection's task, and hyper polls the request's future whenever that
//! task wakes. So the connection keeps one timer of its own ([`Watch`]) and the
//! request only writes its deadline into a shared cell ([`ConnDeadline`]): a
//! deadline later than the armed one leaves the timer alone, and a timer that
//! fires early is re-armed, about once per route timeout and connection.
//!
//! HTTP/2 runs each request as its own task: those keep a timer each ([`Bounded`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep, Timeout};

/// No request in flight, or one that has no deadline here.
const NONE: u64 = u64::MAX;

/// Written by the request in flight, read by its connection. Both run on the
/// connection's one task, so the atomics are never contended; they only make the
/// cell shareable between the two.
#[derive(Debug)]
pub struct ConnDeadline {
    base: Instant,
    /// When the request in flight times out, in nanoseconds after `base`.
    at: AtomicU64,
    /// Set by the connection once `at` has passed.
    passed: AtomicBool,
}

impl ConnDeadline {
    pub fn new() -> Self {
        ConnDeadline {
            base: Instant::now(),
            at: AtomicU64::new(NONE),
            passed: AtomicBool::new(false),
        }
    }

    /// The request in flight ends at `deadline`, until the guard is dropped (its
    /// answer is on its way, or the request was given up).
    pub fn arm(&self, deadline: Instant) -> Armed<'_> {
        let at = deadline.saturating_duration_since(self.base).as_nanos();
        self.passed.store(false, Ordering::Relaxed);
        self.at
            .store(u64::try_from(at).unwrap_or(NONE - 1), Ordering::Relaxed);
        Armed(self)
    }

    fn passed(&self) -> bool {
        self.passed.load(Ordering::Relaxed)
    }

    fn armed(&self) -> Option<Instant> {
        match self.at.load(Ordering::Relaxed) {
            NONE => None,
            at => Some(self.base + Duration::from_nanos(at)),
        }
    }
}

/// A deadline in the cell; dropping it clears the cell, so that the connection's
/// timer does not watch a request that is over.
#[derive(Debug)]
pub struct Armed<'a>(&'a ConnDeadline);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.at.store(NONE, Ordering::Relaxed);
    }
}

impl Default for ConnDeadline {
    fn default() -> Self {
        Self::new()
    }
}

/// The connection's side: its one timer, armed for the deadline of the request in
/// flight. Created on the first deadline, kept for the connection's life.
#[derive(Default)]
pub struct Watch {
    timer: Option<Pin<Box<Sleep>>>,
    /// What the timer is armed for.
    timer_at: Option<Instant>,
    /// The timer holds the task's waker for `timer_at` (a task's waker does not
    /// change): it needs polling again only once it has fired.
    registered: bool,
}

impl Watch {
    /// Called each time the connection's task is polled, after hyper's connection:
    /// arms the timer for the deadline armed meanwhile. `true` when that deadline
    /// has now passed: it is marked so, and hyper must poll the request again, to
    /// answer 504. Once per deadline.
    pub fn poll_expired(&mut self, cell: &ConnDeadline, cx: &mut Context<'_>) -> bool {
        let Some(deadline) = cell.armed() else {
            return false;
        };
        if cell.passed() {
            return false;
        }
        // Moved only earlier: a later deadline finds the timer firing early.
        if self.timer_at.is_none_or(|at| deadline < at) {
            match &mut self.timer {
                Some(t) => t.as_mut().reset(deadline),
                None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.timer_at = Some(deadline);
            self.registered = false;
        }
        let Some(timer) = self.timer.as_mut() else {
            return false;
        };
        if self.registered && !timer.is_elapsed() {
            return false;
        }
        loop {
            if timer.as_mut().poll(cx).is_pending() {
                self.registered = true;
                return false;
            }
            // Fired: for this deadline, or for an earlier one since extended.
            if self.timer_at.is_some_and(|at| at >= deadline) {
                self.registered = false;
                cell.passed.store(true, Ordering::Relaxed);
                return true;
            }
            self.timer_at = Some(deadline);
            timer.as_mut().reset(deadline);
        }
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("timer_at", &self.timer_at)
            .finish()
    }
}

/// The deadline ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

pin_project_lite::pin_project! {
    /// `fut`, bounded by the route deadline: the connection's (HTTP/1), or a
    /// timer of its own (HTTP/2, where each request is a task).
    #[project = BoundedProj]
    pub enum Bounded<'a, F> {
        Conn { #[pin] fut: F, cell: &'a ConnDeadline },
        Timer { #[pin] fut: Timeout<F> },
    }
}

impl<'a, F: Future> Bounded<'a, F> {
    /// The caller arms `cell` with `deadline` beforehand (once per request).
    pub fn new(fut: F, deadline: Instant, cell: Option<&'a ConnDeadline>) -> Self {
        match cell {
            Some(cell) => Bounded::Conn { fut, cell },
            None => Bounded::Timer {
                fut: tokio::time::timeout_at(deadline, fut),
            },
        }
    }
}

impl<F: Future> Future for Bounded<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BoundedProj::Conn { fut, cell } => {
                // A request whose answer is ready is not failed for being late.
                if let Poll::Ready(out) = fut.poll(cx) {
                    return Poll::Ready(Ok(out));
                }
                if cell.passed() {
                    return Poll::Ready(Err(Elapsed));
                }
                Poll::Pending
            }
            BoundedProj::Timer { fut } => fut.poll(cx).map(|r| r.map_err(|_| Elapsed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::future::{pending, ready};
    use std::task::Waker;

    use super::*;

    fn poll_once<F: Future>(f: F) -> Poll<F::Output> {
        let mut f = std::pin::pin!(f);
        f.as_mut().poll(&mut Context::from_waker(Waker::noop()))
    }

    #[tokio::test(start_paused = true)]
    async fn a_passed_deadline_ends_the_request_but_not_a_ready_answer() {
        let cell = ConnDeadline::new();
        let deadline = Instant::now() + Duration::from_secs(1);
        let armed = cell.arm(deadline);
        assert_eq!(cell.armed(), Some(deadline));
        assert!(poll_once(Bounded::new(pending::<()>(), deadline, Some(&cell))).is_pending());
        cell.passed.store(true, Ordering::Relaxed);
        assert_eq!(
            poll_once(Bounded::new(pending::<()>(), deadline, Some(&cell))),
            Poll::Ready(Err(Elapsed))
        );
        assert_eq!(
            poll_once(Bounded::new(ready(7), deadline, Some(&cell))),
            Poll::Ready(Ok(7))
        );
        // The next request starts afresh; a request that is over leaves no deadline.
        drop(armed);
        assert_eq!(cell.armed(), None);
        let next = cell.arm(deadline + Duration::from_secs(1));
        assert!(!cell.passed());
        drop(next);
        assert_eq!(cell.armed(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_watch_fires_once_per_deadline_and_not_early() {
        let cell = ConnDeadline::new();
        let mut watch = Watch::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        // Nothing armed: nothing to watch.
        assert!(!watch.poll_expired(&cell, &mut cx));
        // One request after another, each guard dropped when its request is over.
        let first = Instant::now() + Duration::from_millis(100);
        {
            let _armed = cell.arm(first);
            assert!(!watch.poll_expired(&cell, &mut cx));
        }
        {
            // A later deadline leaves the timer where it is; when it fires early,
            // the deadline has not passed.
            let _armed = cell.arm(first + Duration::from_millis(100));
            tokio::time::advance(Duration::from_millis(150)).await;
            assert!(!watch.poll_expired(&cell, &mut cx));
            assert!(!cell.passed());
            tokio::time::advance(Duration::from_millis(60)).await;
            assert!(watch.poll_expired(&cell, &mut cx));
            assert!(cell.passed());
            assert!(!watch.poll_expired(&cell, &mut cx), "once per deadline");
        }
        {
            let _armed = cell.arm(Instant::now() + Duration::from_secs(60));
            assert!(!watch.poll_expired(&cell, &mut cx));
        }
        // An earlier deadline than the one armed moves the timer.
        let _armed = cell.arm(Instant::now() + Duration::from_millis(10));
        assert!(!watch.poll_expired(&cell, &mut cx));
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(watch.poll_expired(&cell, &mut cx));
    }
}
