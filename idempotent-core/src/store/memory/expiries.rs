//! A shard's completed records by deadline, soonest first: the order in
//! which they expire and in which they go when the shard is full.
//!
//! Records of one TTL complete in deadline order, so most entries arrive
//! in order and go on the back of a queue in O(1). Entries that arrive
//! earlier than the queue's back (a shorter TTL after a longer one, or a
//! cached record of a durable store with its own deadline) go into a heap
//! beside it, so that a short-lived record never waits for a long-lived
//! one: with one queue in completion order, expired records of a short TTL
//! stayed behind a live record of a long TTL and took its room, and that
//! live record was the one evicted.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

/// An entry names its record by hash and deadline; one that no longer
/// matches a completed record (it expired and the key was reused) is
/// skipped when it comes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Expiry {
    /// First, so that entries order by deadline.
    pub(super) expires_at: u64,
    pub(super) hash: u64,
}

#[derive(Default)]
pub(super) struct Expiries {
    /// Entries in non-decreasing deadline order.
    in_order: VecDeque<Expiry>,
    /// Entries that came earlier than `in_order`'s back.
    out_of_order: BinaryHeap<Reverse<Expiry>>,
}

impl Expiries {
    pub(super) fn push(&mut self, expiry: Expiry) {
        match self.in_order.back() {
            Some(back) if back.expires_at > expiry.expires_at => {
                self.out_of_order.push(Reverse(expiry));
            }
            _ => self.in_order.push_back(expiry),
        }
    }

    /// The entry with the soonest deadline.
    pub(super) fn first(&self) -> Option<Expiry> {
        let queued = self.in_order.front().copied();
        let heaped = self.out_of_order.peek().map(|Reverse(expiry)| *expiry);
        match (queued, heaped) {
            (Some(queued), Some(heaped)) => Some(queued.min(heaped)),
            (queued, heaped) => queued.or(heaped),
        }
    }

    /// Removes the entry [`first`](Self::first) returns.
    pub(super) fn pop_first(&mut self) -> Option<Expiry> {
        let first = self.first()?;
        if self.in_order.front() == Some(&first) {
            self.in_order.pop_front()
        } else {
            self.out_of_order.pop().map(|Reverse(expiry)| expiry)
        }
    }

    /// Shrinks the queue and the heap to fit once `sparse` times their
    /// entries would still fit in them, as after a burst of records went.
    pub(super) fn give_back_room(&mut self, sparse: usize) {
        if self.in_order.capacity() > room_kept(self.in_order.len(), sparse) {
            self.in_order.shrink_to_fit();
        }
        if self.out_of_order.capacity() > room_kept(self.out_of_order.len(), sparse) {
            self.out_of_order.shrink_to_fit();
        }
    }

    /// Heap the queue and the heap hold, in bytes.
    #[cfg(test)]
    pub(super) fn allocation_size(&self) -> usize {
        let entries = self.in_order.capacity() + self.out_of_order.capacity();
        entries * std::mem::size_of::<Expiry>()
    }

    /// Entries queued, stale ones included.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.in_order.len() + self.out_of_order.len()
    }
}

/// Entries a queue of `len` keeps room for: `sparse` times as many, and
/// at least 4,096 (64 KiB), which it is not worth reallocating to free.
fn room_kept(len: usize, sparse: usize) -> usize {
    len.saturating_mul(sparse).max(4_096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(expires_at: u64) -> Expiry {
        Expiry {
            expires_at,
            hash: expires_at * 7,
        }
    }

    #[test]
    fn entries_come_out_soonest_first_whatever_order_they_went_in() {
        let mut expiries = Expiries::default();
        for deadline in [10, 20, 5, 30, 15, 30, 1, 40] {
            expiries.push(at(deadline));
        }
        assert_eq!(expiries.len(), 8);
        let mut out = Vec::new();
        while let Some(expiry) = expiries.pop_first() {
            out.push(expiry.expires_at);
        }
        assert_eq!(out, [1, 5, 10, 15, 20, 30, 30, 40]);
        assert_eq!(expiries.len(), 0);
    }

    #[test]
    fn entries_in_deadline_order_stay_out_of_the_heap() {
        let mut expiries = Expiries::default();
        for deadline in [1, 2, 2, 3] {
            expiries.push(at(deadline));
        }
        assert!(expiries.out_of_order.is_empty());
        assert_eq!(expiries.first(), Some(at(1)));
    }
}
