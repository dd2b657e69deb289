//! Single flight: at most one token request per provider at a time, every waiter
//! sharing its outcome. The slot lives inside the provider's refresh bookkeeping
//! (one mutex, taken briefly), so "is one in flight? else start one" is a single
//! decision; waiting happens outside it. The request itself runs in a task of its
//! own: a waiter giving up never cancels it (a rotated refresh token must never be
//! lost mid-flight).

use std::time::Duration;

use tokio::sync::watch;

/// The slot for the one flight in progress, if any.
#[derive(Debug)]
pub(super) struct SingleFlight<T> {
    current: Option<Flight<T>>,
}

impl<T> Default for SingleFlight<T> {
    fn default() -> Self {
        Self { current: None }
    }
}

#[derive(Debug)]
struct Flight<T> {
    outcome: watch::Receiver<Option<T>>,
    /// The generation held when the flight was asked for: its result is above
    /// it, or an error.
    above: Option<u64>,
}

/// The flight's end that publishes its outcome. Dropped without landing (the task
/// unwound), its waiters are told the flight was abandoned.
#[derive(Debug)]
pub(super) struct Landing<T>(watch::Sender<Option<T>>);

/// A waiter's share of a flight's outcome.
#[derive(Debug)]
pub(super) struct Waiter<T>(watch::Receiver<Option<T>>);

impl<T: Clone> SingleFlight<T> {
    pub(super) fn in_flight(&self) -> bool {
        self.current.is_some()
    }

    /// The flight in progress, to wait on, with the generation held when it was
    /// asked for.
    pub(super) fn join(&self) -> Option<(Waiter<T>, Option<u64>)> {
        self.current
            .as_ref()
            .map(|f| (Waiter(f.outcome.clone()), f.above))
    }

    /// Starts a flight (there must be none in progress: callers `join` first,
    /// under the same lock). `above`: the generation held now.
    pub(super) fn begin(&mut self, above: Option<u64>) -> (Landing<T>, Waiter<T>) {
        debug_assert!(self.current.is_none(), "a second flight was begun");
        let (tx, rx) = watch::channel(None);
        self.current = Some(Flight {
            outcome: rx.clone(),
            above,
        });
        (Landing(tx), Waiter(rx))
    }

    /// Empties the slot. The flight's task does this before it lands, so a waiter
    /// that wakes and needs another flight at once can begin one.
    pub(super) fn end(&mut self) {
        self.current = None;
    }
}

impl<T> Landing<T> {
    /// Publishes the outcome to every waiter, present and late.
    pub(super) fn land(self, outcome: T) {
        let _ = self.0.send(Some(outcome));
    }
}

impl<T: Clone> Waiter<T> {
    /// The flight's outcome; `None` when `within` passes first or the flight was
    /// abandoned.
    pub(super) async fn wait(mut self, within: Duration) -> Option<T> {
        match tokio::time::timeout(within, self.0.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => v.clone(),
            _ => None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const LONG: Duration = Duration::from_secs(3600);

    #[tokio::test(start_paused = true)]
    async fn every_waiter_gets_the_one_outcome() {
        let mut slot = SingleFlight::<u32>::default();
        let (landing, first) = slot.begin(Some(4));
        let joined: Vec<_> = (0..10).map(|_| slot.join().unwrap()).collect();
        assert!(joined.iter().all(|(_, above)| *above == Some(4)));
        let waits: Vec<_> = joined
            .into_iter()
            .map(|(w, _)| tokio::spawn(w.wait(LONG)))
            .collect();
        slot.end();
        landing.land(7);
        assert_eq!(first.wait(LONG).await, Some(7));
        for w in waits {
            assert_eq!(w.await.unwrap(), Some(7));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_giving_up_leaves_the_flight_to_the_others() {
        let mut slot = SingleFlight::<u32>::default();
        let (landing, _) = slot.begin(None);
        let (impatient, _) = slot.join().unwrap();
        let (patient, _) = slot.join().unwrap();
        assert_eq!(impatient.wait(Duration::from_secs(1)).await, None);
        assert!(slot.in_flight());
        let later = tokio::spawn(patient.wait(LONG));
        tokio::time::sleep(Duration::from_secs(30)).await;
        landing.land(1);
        assert_eq!(later.await.unwrap(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flight_dropped_without_landing_is_abandoned() {
        let mut slot = SingleFlight::<u32>::default();
        let (landing, waiter) = slot.begin(None);
        drop(landing);
        assert_eq!(waiter.wait(LONG).await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn once_ended_a_new_flight_can_begin_and_old_waiters_keep_theirs() {
        let mut slot = SingleFlight::<u32>::default();
        let (first, old) = slot.begin(Some(1));
        slot.end();
        assert!(slot.join().is_none());
        first.land(2);
        let (second, new) = slot.begin(Some(2));
        assert_eq!(slot.join().unwrap().1, Some(2));
        second.land(3);
        assert_eq!(old.wait(LONG).await, Some(2));
        assert_eq!(new.wait(LONG).await, Some(3));
    }
}
