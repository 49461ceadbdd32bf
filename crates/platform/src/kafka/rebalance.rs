//! What the consumer does when the group moves partitions: on assign, start tracking them
//! afresh; on revoke, stop starting their records, let records in hand finish within a
//! deadline, commit what is settled synchronously, and forget them so that nothing more is
//! stored for partitions this consumer no longer owns.
//!
//! librdkafka calls these callbacks on the thread that polls the consumer (the consume loop,
//! inside `recv`), before it gives the partitions up. Records are handled in tasks of their
//! own, so the loop may block here while they finish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::TopicPartitionList;

use super::offsets::{OffsetTracker, Partition, Settlement, Ticket};

/// The consumer's context: the offsets of the partitions it owns, shared with the loop.
pub struct ConsumeContext {
    pub(crate) ownership: Arc<Ownership>,
}

impl ConsumeContext {
    pub fn new(revoke_timeout: Duration) -> Self {
        Self {
            ownership: Arc::new(Ownership {
                tracker: Mutex::new(OffsetTracker::new()),
                settled: Condvar::new(),
                revoke_timeout,
                closing: AtomicBool::new(false),
            }),
        }
    }
}

impl ClientContext for ConsumeContext {}

impl ConsumerContext for ConsumeContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(partitions) => self.ownership.assign(partitions),
            Rebalance::Revoke(partitions) => self.ownership.revoke(partitions, || commit(consumer)),
            Rebalance::Error(error) => tracing::warn!(%error, "rebalance error"),
        }
    }
}

fn commit<C: ConsumerContext>(consumer: &BaseConsumer<C>) {
    match consumer.commit_consumer_state(CommitMode::Sync) {
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => tracing::warn!(%error, "commit on revoke failed; the next owner redelivers"),
    }
}

/// Which partitions this consumer owns and which of their records are settled.
pub(crate) struct Ownership {
    tracker: Mutex<OffsetTracker>,
    settled: Condvar,
    revoke_timeout: Duration,
    /// Set once the loop has ended: a revoke then waits for nothing.
    closing: AtomicBool,
}

impl Ownership {
    fn lock(&self) -> MutexGuard<'_, OffsetTracker> {
        self.tracker.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn assign(&self, partitions: &TopicPartitionList) {
        let mut tracker = self.lock();
        for p in partitions.elements() {
            tracker.assign(p.topic(), p.partition());
        }
        tracing::info!(partitions = partitions.count(), "partitions assigned");
    }

    fn revoke(&self, partitions: &TopicPartitionList, commit: impl FnOnce()) {
        let revoked: Vec<Partition> = partitions
            .elements()
            .iter()
            .map(|p| (Arc::from(p.topic()), p.partition()))
            .collect();
        {
            let mut tracker = self.lock();
            for (topic, partition) in &revoked {
                tracker.start_revoking(topic, *partition);
            }
        }
        let started = Instant::now();
        let unfinished = if self.closing.load(Ordering::SeqCst) {
            self.lock().in_flight_of(&revoked)
        } else {
            wait_blocking(|can_wait| {
                let deadline = started + if can_wait { self.revoke_timeout } else { Duration::ZERO };
                let mut tracker = self.lock();
                loop {
                    let in_flight = tracker.in_flight_of(&revoked);
                    let now = Instant::now();
                    if in_flight == 0 || now >= deadline {
                        return in_flight;
                    }
                    tracker = self
                        .settled
                        .wait_timeout(tracker, deadline - now)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0;
                }
            })
        };
        {
            let mut tracker = self.lock();
            for (topic, partition) in &revoked {
                tracker.revoke(topic, *partition);
            }
        }
        commit();
        tracing::info!(
            partitions = revoked.len(),
            unfinished,
            waited_ms = started.elapsed().as_millis() as u64,
            "partitions revoked; unfinished records go to the next owner"
        );
    }

    /// Takes a received record for handling, or `None` when its partition is not ours.
    pub(crate) fn take(&self, topic: &str, partition: i32, offset: i64) -> Option<Ticket> {
        self.lock().take(topic, partition, offset)
    }

    pub(crate) fn may_start(&self, ticket: &Ticket) -> bool {
        self.lock().may_start(ticket)
    }

    /// Settles a record and stores the partition's offset when its settled prefix grew. The
    /// store happens under the lock a revoke takes, so nothing is stored for a partition
    /// after it was let go.
    pub(crate) fn settle<C: ConsumerContext>(
        &self,
        consumer: &rdkafka::consumer::StreamConsumer<C>,
        ticket: &Ticket,
        settlement: Settlement,
    ) {
        let mut tracker = self.lock();
        if let Some(offset) = tracker.settle(ticket, settlement)
            && let Err(error) = consumer.store_offset(&ticket.topic, ticket.partition, offset)
        {
            tracing::warn!(%error, topic = %ticket.topic, partition = ticket.partition, offset, "offset not stored");
        }
        drop(tracker);
        self.settled.notify_all();
    }

    /// The loop has ended: later revokes (the consumer closing) wait for nothing.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.settled.notify_all();
    }
}

/// Runs `wait` on the polling thread, telling it whether waiting can help: on a multi-threaded
/// runtime the records' tasks go on elsewhere while this thread blocks; on a single-threaded
/// one they cannot, so the wait must not block.
fn wait_blocking<T>(wait: impl FnOnce(bool) -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(|| wait(true)),
        Ok(_) => wait(false),
        // Not on a runtime thread (librdkafka's own): blocking here stalls nobody's tasks.
        Err(_) => wait(true),
    }
}
