//! A service reads its state marker from many records' tasks at once: reads that return in
//! another order than they were sent are not a Redis that went back to an older copy; a marker
//! behind what the instance had seen before the read is. Against the dev stack's Redis.

use forfall_platform::admin::Readiness;
use forfall_platform::changelog::Progress;
use forfall_platform::config;
use forfall_platform::derived_state::{DerivedState, Rebuild};
use forfall_platform::rebuild_resume::Resume;
use forfall_platform::redis_store::Keys;

/// State with nothing to replay: the test moves the marker itself.
struct Empty;

impl Rebuild for Empty {
    async fn rebuild(&self, _: &Resume, _: &(dyn Fn(&Progress) + Send + Sync)) -> anyhow::Result<Progress> {
        Ok(Progress::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_overtaken_by_a_later_one_is_not_a_lost_state_and_an_older_marker_is() -> anyhow::Result<()> {
    let common = config::common(&config::figment(Some(std::path::Path::new(
        "/nonexistent/forfall.toml",
    ))))?;
    let mut redis = forfall_platform::redis_store::connect(&common.redis).await?;
    let keys = Keys::new(&format!("reads{}:", uuid::Uuid::new_v4().simple()));
    let state = DerivedState::new(&keys, "reader", redis.clone(), Readiness::default(), Empty);
    state.ensure_ready().await.map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let marker = state.marker_key().to_owned();
    let get = |redis: &mut redis::aio::ConnectionManager| {
        let mut redis = redis.clone();
        let marker = marker.clone();
        async move {
            redis::cmd("GET")
                .arg(&marker)
                .query_async::<Option<String>>(&mut redis)
                .await
        }
    };
    let (epoch, _) = state.seen();
    let set = |redis: &mut redis::aio::ConnectionManager, writes: i64| {
        let mut redis = redis.clone();
        let (marker, value) = (marker.clone(), format!("ready:{epoch}:{writes}"));
        async move {
            redis::cmd("SET")
                .arg(&marker)
                .arg(value)
                .query_async::<()>(&mut redis)
                .await
        }
    };

    // Task A reads the marker; another task's write moves it on; task B reads it and is
    // checked first; then A's read, sent before the write, is checked.
    let floor_a = state.read_floor();
    let read_a = get(&mut redis).await?;
    set(&mut redis, 1).await?;
    let floor_b = state.read_floor();
    let read_b = get(&mut redis).await?;
    state
        .check(read_b.as_deref(), floor_b)
        .map_err(|e| anyhow::anyhow!("the later read: {e:?}"))?;
    assert_eq!(state.seen(), (epoch, 1));
    state
        .check(read_a.as_deref(), floor_a)
        .map_err(|e| anyhow::anyhow!("a read overtaken by a later one is taken for a lost state: {e:?}"))?;
    assert_eq!(state.seen(), (epoch, 1), "what was seen never goes back");

    // Redis restored from a copy older than what the instance had seen before reading.
    set(&mut redis, 0).await?;
    let floor = state.read_floor();
    let read = get(&mut redis).await?;
    assert!(
        state.check(read.as_deref(), floor).is_err(),
        "a marker behind what was seen before the read is a lost state"
    );
    let _: () = redis::cmd("DEL").arg(&marker).query_async(&mut redis).await?;
    Ok(())
}
