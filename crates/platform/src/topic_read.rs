//! Reading topics whole, decoded, for what is computed from them after the fact (experiment
//! reports, the propensity model's training set): every partition from its start up to its end
//! as the read starts, each record decoded through the registry and handed over in order.

use crate::avro::Decoded;
use crate::changelog::{self, Change, Progress, Restore};
use crate::kafka::Failure;
use crate::service::Runtime;

/// Hands each decoded record to `take`; counts what cannot be decoded or taken.
struct Decoding<'a, F> {
    rt: &'a Runtime,
    take: F,
    undecodable: u64,
}

impl<F: FnMut(&Decoded) -> anyhow::Result<()> + Send> Restore for Decoding<'_, F> {
    async fn apply(&mut self, _partition: i32, changes: Vec<Change>) -> Result<(), Failure> {
        for change in changes {
            let decoded = match self.rt.codec.decode(change.value.as_deref()).await {
                Ok(d) => d,
                // The registry away is waited out (the replay retries the batch), not counted.
                Err(e) if e.is_transient() => return Err(Failure::Transient(e.into())),
                Err(_) => {
                    self.undecodable += 1;
                    continue;
                }
            };
            if (self.take)(&decoded).is_err() {
                self.undecodable += 1;
            }
        }
        Ok(())
    }

    async fn finish(&mut self, _partition: i32, _end: i64) -> Result<(), Failure> {
        Ok(())
    }
}

/// Reads `topic` (its full name) whole, handing each record to `take`; `progress` hears the
/// replay's progress. The records that could not be decoded, or that `take` refused.
pub async fn read_whole(
    rt: &Runtime,
    topic: &str,
    take: impl FnMut(&Decoded) -> anyhow::Result<()> + Send,
    progress: impl FnMut(&Progress),
) -> anyhow::Result<(Progress, u64)> {
    let mut reader = Decoding {
        rt,
        take,
        undecodable: 0,
    };
    let done = changelog::replay_whole(&rt.config.kafka, topic, 2_000, &mut reader, progress).await?;
    Ok((done, reader.undecodable))
}
