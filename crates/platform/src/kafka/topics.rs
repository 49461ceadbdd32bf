//! Creating topics, with a broker that is slow to answer at start waited out rather than
//! taken for a refusal: every service checks its topics as it starts, and a broker just
//! restarted (or electing a controller) answers its first admin requests late or with
//! `OperationTimedOut`.

use std::future::Future;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;

use crate::config::KafkaConfig;

/// How long a start waits for a broker that does not answer, as it waits for Redis.
const BROKER_PATIENCE: Duration = Duration::from_secs(300);
/// One attempt at an admin request, answered or not.
const ADMIN_ATTEMPT: Duration = Duration::from_secs(30);
/// The broker's own bound on one request: a broker that does not answer within it is asked again.
const ADMIN_REQUEST: Duration = Duration::from_secs(10);

/// Why an attempt at an admin request did not succeed.
pub(crate) enum Attempt {
    /// The broker answered, and asking again would get the same answer (a mismatch, a
    /// refusal of authorisation, an invalid setting).
    Refused(anyhow::Error),
    /// The broker did not answer, or answered that it could not yet: asked again.
    Unanswered(anyhow::Error),
}

/// Runs `attempt` until it succeeds or is refused, asking again with backoff for up to
/// [`BROKER_PATIENCE`] while the broker does not answer; `what` names it in the log and the error.
pub(crate) async fn patiently<T, Fut>(what: &str, mut attempt: impl FnMut() -> Fut) -> anyhow::Result<T>
where
    Fut: Future<Output = Result<T, Attempt>>,
{
    let deadline = tokio::time::Instant::now() + BROKER_PATIENCE;
    let mut backoff = Duration::from_millis(200);
    loop {
        let failure = match tokio::time::timeout(ADMIN_ATTEMPT, attempt()).await {
            Ok(Ok(done)) => return Ok(done),
            Ok(Err(Attempt::Refused(e))) => return Err(e.context(format!("{what}: refused"))),
            Ok(Err(Attempt::Unanswered(e))) => e,
            Err(_) => anyhow::anyhow!("no answer from the broker within {ADMIN_ATTEMPT:?}"),
        };
        if tokio::time::Instant::now() + backoff > deadline {
            return Err(failure.context(format!("{what}: the broker did not answer within {BROKER_PATIENCE:?}")));
        }
        tracing::warn!(what, error = %failure, "the broker has not answered yet; asking again");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// What a broker answers for a topic it will not create, whoever asks and however often.
fn refused_for_good(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::ClusterAuthorizationFailed
            | RDKafkaErrorCode::InvalidTopic
            | RDKafkaErrorCode::InvalidPartitions
            | RDKafkaErrorCode::InvalidReplicationFactor
            | RDKafkaErrorCode::InvalidReplicaAssignment
            | RDKafkaErrorCode::InvalidConfig
            | RDKafkaErrorCode::InvalidRequest
            | RDKafkaErrorCode::PolicyViolation
            | RDKafkaErrorCode::UnsupportedVersion
    )
}

/// One attempt at creating `topics` (each with `partitions` and the `settings`); a topic that
/// exists is left as it is.
pub(crate) async fn create_once(
    config: &KafkaConfig,
    topics: &[String],
    partitions: i32,
    settings: &[(&str, &str)],
) -> Result<(), Attempt> {
    let admin: AdminClient<DefaultClientContext> = crate::kafka::base_config(config)
        .create()
        .map_err(|e| Attempt::Refused(e.into()))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|t| {
            settings.iter().fold(
                NewTopic::new(t, partitions, TopicReplication::Fixed(config.replication_factor)),
                |topic, (name, value)| topic.set(name, value),
            )
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(ADMIN_REQUEST))
        .request_timeout(Some(ADMIN_REQUEST));
    let results = admin
        .create_topics(&new, &options)
        .await
        .map_err(|e| Attempt::Unanswered(e.into()))?;
    let mut not_yet = None;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) if refused_for_good(code) => {
                return Err(Attempt::Refused(anyhow::anyhow!(
                    "cannot create topic '{topic}': {code}"
                )));
            }
            Err((topic, code)) => not_yet = Some(anyhow::anyhow!("topic '{topic}' not created yet: {code}")),
        }
    }
    not_yet.map_or(Ok(()), |e| Err(Attempt::Unanswered(e)))
}

/// Creates the topics that are missing (existing ones are left as they are), waiting out a
/// broker that does not answer yet.
pub async fn ensure_topics(config: &KafkaConfig, topics: &[String]) -> anyhow::Result<()> {
    patiently("creating the topics", || {
        create_once(config, topics, config.partitions, &[])
    })
    .await
}
