//! Which offsets a consumer may store: the pure bookkeeping behind the consume runtime's rule.
//!
//! **The rule.** An offset is stored only for the contiguous prefix of a partition's records
//! that are settled (applied or rejected, their outputs acknowledged). A record that failed or
//! was interrupted stops storing for its partition: nothing after it is stored until the
//! partition is assigned anew (after a restart or a rebalance), so the record is redelivered,
//! never skipped. A partition that is revoked is forgotten at once: a record of it that settles
//! later stores nothing, and a record received for it before the revoke is not started.
//!
//! Each assignment of a partition gets its own generation, so that a late settlement from an
//! earlier assignment of the same partition cannot move the new one's offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// A topic and partition.
pub type Partition = (Arc<str>, i32);

/// One record taken for handling, to be settled exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    generation: u64,
}

impl Ticket {
    /// Whether both records came from the same assignment of the same partition.
    pub fn same_assignment(&self, other: &Ticket) -> bool {
        self.topic == other.topic && self.partition == other.partition && self.generation == other.generation
    }
}

/// How a record's handling ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Applied or rejected, and everything it produced acknowledged.
    Done,
    /// Failed, or interrupted by shutdown or revoke: it must be redelivered.
    Unfinished,
}

#[derive(Debug)]
struct Track {
    generation: u64,
    /// Records taken and not yet part of the stored prefix, by offset.
    open: BTreeMap<i64, State>,
    /// Set when the partition is being revoked: records not started yet are not started.
    revoking: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    InFlight,
    Done,
    /// Failed or interrupted: blocks the prefix until the partition is assigned anew.
    Blocked,
}

/// The offsets of every partition this consumer owns.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, Track>,
    generations: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition is (again) this consumer's: whatever was known of it before is dropped.
    pub fn assign(&mut self, topic: &str, partition: i32) {
        self.generations += 1;
        self.partitions.insert(
            (Arc::from(topic), partition),
            Track {
                generation: self.generations,
                open: BTreeMap::new(),
                revoking: false,
            },
        );
    }

    /// The partition is about to be taken away: records not started yet will not be.
    pub fn start_revoking(&mut self, topic: &str, partition: i32) {
        if let Some(track) = self.track_mut(topic, partition) {
            track.revoking = true;
        }
    }

    /// The partition is no longer this consumer's; later settlements of it store nothing.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        self.partitions.remove(&(Arc::from(topic), partition));
    }

    /// Forgets every partition (the consumer is closing).
    pub fn revoke_all(&mut self) {
        self.partitions.clear();
    }

    /// Takes a received record for handling. `None` when the partition is not owned or is
    /// being revoked: the record is not handled (the next owner gets it).
    pub fn take(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        let key: Partition = (Arc::from(topic), partition);
        let track = self.partitions.get_mut(&key)?;
        if track.revoking {
            return None;
        }
        if let Some((&last, _)) = track.open.last_key_value()
            && offset <= last
        {
            // Offsets only grow within one assignment; an older one is a stale copy.
            return None;
        }
        track.open.insert(offset, State::InFlight);
        Some(Ticket {
            topic: key.0,
            partition,
            offset,
            generation: track.generation,
        })
    }

    /// Whether a taken record may still start: its partition is owned by the same assignment
    /// and is not being revoked.
    pub fn may_start(&self, ticket: &Ticket) -> bool {
        self.partitions
            .get(&(ticket.topic.clone(), ticket.partition))
            .is_some_and(|t| t.generation == ticket.generation && !t.revoking)
    }

    /// Records how a record ended. Returns the offset to store when the partition's settled
    /// prefix grew: the last offset of that prefix (the consumer commits the one after it).
    pub fn settle(&mut self, ticket: &Ticket, settlement: Settlement) -> Option<i64> {
        let track = self
            .partitions
            .get_mut(&(ticket.topic.clone(), ticket.partition))
            .filter(|t| t.generation == ticket.generation)?;
        let state = track.open.get_mut(&ticket.offset)?;
        if *state != State::InFlight {
            return None;
        }
        *state = match settlement {
            Settlement::Done => State::Done,
            Settlement::Unfinished => State::Blocked,
        };
        let mut stored = None;
        while let Some(entry) = track.open.first_entry() {
            if *entry.get() != State::Done {
                break;
            }
            stored = Some(*entry.key());
            entry.remove();
        }
        stored
    }

    /// Records of `partitions` still being handled.
    pub fn in_flight_of(&self, partitions: &[Partition]) -> usize {
        partitions
            .iter()
            .filter_map(|p| self.partitions.get(p))
            .map(|t| t.open.values().filter(|s| **s == State::InFlight).count())
            .sum()
    }

    /// Records of every owned partition still being handled.
    pub fn in_flight(&self) -> usize {
        self.partitions
            .values()
            .map(|t| t.open.values().filter(|s| **s == State::InFlight).count())
            .sum()
    }

    /// Whether a failed or interrupted record holds the partition's offsets back.
    pub fn is_blocked(&self, topic: &str, partition: i32) -> bool {
        self.partitions
            .get(&(Arc::from(topic), partition))
            .is_some_and(|t| t.open.values().any(|s| *s == State::Blocked))
    }

    fn track_mut(&mut self, topic: &str, partition: i32) -> Option<&mut Track> {
        self.partitions.get_mut(&(Arc::from(topic), partition))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn tracker_with(topic: &str, partitions: &[i32]) -> OffsetTracker {
        let mut t = OffsetTracker::new();
        for p in partitions {
            t.assign(topic, *p);
        }
        t
    }

    #[test]
    fn offsets_are_stored_in_order_whatever_order_records_settle_in() {
        let mut t = tracker_with("a", &[0]);
        let tickets: Vec<Ticket> = (10..14).map(|o| t.take("a", 0, o).expect("owned")).collect();
        assert_eq!(t.settle(&tickets[2], Settlement::Done), None, "12 waits for 10 and 11");
        assert_eq!(t.settle(&tickets[1], Settlement::Done), None, "11 waits for 10");
        assert_eq!(
            t.settle(&tickets[0], Settlement::Done),
            Some(12),
            "10..=12 are a prefix"
        );
        assert_eq!(t.settle(&tickets[3], Settlement::Done), Some(13));
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_failed_record_stops_storing_for_its_partition_only() {
        let mut t = tracker_with("a", &[0, 1]);
        let a0 = t.take("a", 0, 0).expect("owned");
        let a1 = t.take("a", 0, 1).expect("owned");
        let a2 = t.take("a", 0, 2).expect("owned");
        let b0 = t.take("a", 1, 0).expect("owned");
        assert_eq!(t.settle(&a0, Settlement::Done), Some(0));
        assert_eq!(t.settle(&a1, Settlement::Unfinished), None);
        assert_eq!(t.settle(&a2, Settlement::Done), None, "nothing past the failed record");
        assert!(t.is_blocked("a", 0));
        let a3 = t.take("a", 0, 3).expect("still owned");
        assert_eq!(t.settle(&a3, Settlement::Done), None, "still nothing past it");
        assert_eq!(t.settle(&b0, Settlement::Done), Some(0), "the other partition goes on");
        assert!(!t.is_blocked("a", 1));
    }

    #[test]
    fn a_gap_is_cleared_only_by_a_new_assignment() {
        let mut t = tracker_with("a", &[0]);
        let first = t.take("a", 0, 5).expect("owned");
        assert_eq!(t.settle(&first, Settlement::Unfinished), None);
        t.assign("a", 0);
        assert!(!t.is_blocked("a", 0));
        // The record is redelivered from the committed offset.
        let again = t.take("a", 0, 5).expect("owned again");
        assert_eq!(t.settle(&again, Settlement::Done), Some(5));
    }

    #[test]
    fn a_revoked_partition_stores_nothing_and_starts_nothing() {
        let mut t = tracker_with("a", &[0]);
        let started = t.take("a", 0, 0).expect("owned");
        let waiting = t.take("a", 0, 1).expect("owned");
        t.start_revoking("a", 0);
        assert!(!t.may_start(&waiting), "not started once revoking");
        assert_eq!(t.take("a", 0, 2), None, "not taken once revoking");
        assert_eq!(t.in_flight_of(&[(Arc::from("a"), 0)]), 2);
        assert_eq!(
            t.settle(&started, Settlement::Done),
            Some(0),
            "in-flight work still stores before the revoke"
        );
        t.revoke("a", 0);
        assert_eq!(
            t.settle(&waiting, Settlement::Done),
            None,
            "after the revoke, nothing is stored"
        );
        assert_eq!(t.take("a", 0, 3), None, "not owned");
    }

    #[test]
    fn a_late_settlement_from_an_earlier_assignment_moves_nothing() {
        let mut t = tracker_with("a", &[0]);
        let old = t.take("a", 0, 7).expect("owned");
        t.revoke("a", 0);
        t.assign("a", 0);
        let new = t.take("a", 0, 7).expect("owned again");
        assert_eq!(t.settle(&old, Settlement::Done), None);
        assert!(!t.may_start(&old));
        assert_eq!(t.in_flight(), 1, "the new assignment's record is still in flight");
        assert_eq!(t.settle(&new, Settlement::Done), Some(7));
    }

    #[test]
    fn a_record_settles_once() {
        let mut t = tracker_with("a", &[0]);
        let x = t.take("a", 0, 0).expect("owned");
        let y = t.take("a", 0, 1).expect("owned");
        assert_eq!(t.settle(&y, Settlement::Unfinished), None);
        assert_eq!(t.settle(&y, Settlement::Done), None, "a blocked record stays blocked");
        assert_eq!(t.settle(&x, Settlement::Done), Some(0));
        assert_eq!(t.settle(&x, Settlement::Done), None);
    }

    proptest! {
        /// Whatever order records settle in and whichever fail, the stored offset is always
        /// the end of the longest prefix of done records, and it only grows.
        #[test]
        fn the_stored_offset_is_the_longest_done_prefix(
            outcomes in proptest::collection::vec(any::<bool>(), 1..60),
            order_seed in proptest::collection::vec(any::<u32>(), 60),
        ) {
            let mut t = tracker_with("a", &[0]);
            let tickets: Vec<Ticket> = (0..outcomes.len() as i64).map(|o| t.take("a", 0, o).expect("owned")).collect();
            let mut order: Vec<usize> = (0..outcomes.len()).collect();
            order.sort_by_key(|i| order_seed[*i]);
            let mut done = vec![false; outcomes.len()];
            let mut stored: Option<i64> = None;
            for i in order {
                let settlement = if outcomes[i] { Settlement::Done } else { Settlement::Unfinished };
                done[i] = outcomes[i];
                if let Some(s) = t.settle(&tickets[i], settlement) {
                    prop_assert!(stored.is_none_or(|prev| s > prev), "the stored offset only grows");
                    stored = Some(s);
                }
                let prefix = done.iter().take_while(|d| **d).count() as i64;
                let expected = if prefix == 0 { None } else { Some(prefix - 1) };
                prop_assert_eq!(stored, expected);
            }
        }
    }
}
