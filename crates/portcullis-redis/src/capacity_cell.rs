//! [`CapacityCell`]: one endpoint's capacity as this process knows it, and a capacity set
//! locally that Redis does not have yet.
//!
//! Redis holds the endpoint's global capacity; every script reply and every `c:<n>`
//! notification carries it. A capacity set in this process (`set_capacity`) applies at once
//! and waits to be stored in Redis by the endpoint's task; until it is stored, the older
//! value in replies is ignored (it would undo the local change). If another local change
//! comes while one is being stored, the flag stays up and the newer value is stored next.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// One endpoint's capacity (see the [module docs](self)).
#[derive(Debug)]
pub(crate) struct CapacityCell {
    current: AtomicUsize,
    /// The capacity last set locally.
    desired: AtomicUsize,
    /// `desired` is not stored in Redis yet.
    dirty: AtomicBool,
}

impl CapacityCell {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            current: AtomicUsize::new(capacity),
            desired: AtomicUsize::new(capacity),
            dirty: AtomicBool::new(false),
        }
    }

    /// The capacity in use.
    pub(crate) fn get(&self) -> usize {
        self.current.load(Ordering::Acquire)
    }

    /// Uses `capacity` (a notification from Redis, or a local change).
    pub(crate) fn apply(&self, capacity: usize) {
        self.current.store(capacity, Ordering::Release);
    }

    /// A capacity read in a script reply: used unless a local change waits to be stored.
    /// `true` when the capacity in use changed.
    pub(crate) fn learned(&self, capacity: usize) -> bool {
        if self.is_pending() || capacity == self.get() {
            return false;
        }
        self.apply(capacity);
        true
    }

    /// A capacity set in this process: used at once, to be stored in Redis.
    pub(crate) fn set_local(&self, capacity: usize) {
        self.desired.store(capacity, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        self.apply(capacity);
    }

    /// A local change waits to be stored.
    pub(crate) fn is_pending(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// The capacity to store: the last one set locally.
    pub(crate) fn to_store(&self) -> usize {
        self.desired.load(Ordering::Acquire)
    }

    /// `capacity` was stored in Redis: nothing waits any more, unless a newer local change
    /// came meanwhile (it is stored next).
    pub(crate) fn stored(&self, capacity: usize) {
        if self.to_store() == capacity {
            self.dirty.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_local_change_wins_until_it_is_stored() {
        let c = CapacityCell::new(4);
        assert!(c.learned(6), "a reply's capacity is used");
        assert!(!c.learned(6), "unchanged");
        c.set_local(10);
        assert_eq!((c.get(), c.to_store()), (10, 10));
        assert!(c.is_pending());
        assert!(!c.learned(6), "the older value in a reply does not undo it");
        assert_eq!(c.get(), 10);
        c.stored(10);
        assert!(!c.is_pending());
        assert!(c.learned(8), "replies count again");
        assert_eq!(c.get(), 8);
    }

    #[test]
    fn a_newer_local_change_is_stored_next() {
        let c = CapacityCell::new(4);
        c.set_local(5);
        let storing = c.to_store();
        c.set_local(9);
        c.stored(storing);
        assert!(c.is_pending(), "9 still waits");
        assert_eq!((c.get(), c.to_store()), (9, 9));
        c.stored(9);
        assert!(!c.is_pending());
    }

    #[test]
    fn a_notification_applies_even_while_a_change_waits() {
        let c = CapacityCell::new(4);
        c.set_local(5);
        c.apply(7);
        assert_eq!(c.get(), 7);
        assert!(c.is_pending());
    }
}
