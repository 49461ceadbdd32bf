//! Redis answers that mean "not now" are waited out, those that mean "never" are not: checked
//! against a real Redis server of the test's own (its memory limit and role are changed, which
//! the shared dev-stack Redis must not see).

mod common;

use common::PrivateRedis;
use forfall_platform::kafka::Failure;

fn kind(result: Result<(), redis::RedisError>) -> &'static str {
    match result.map_err(Failure::from) {
        Ok(()) => "ok",
        Err(Failure::Transient(_)) => "transient",
        Err(Failure::Fatal(_)) => "fatal",
        Err(Failure::Reject { .. }) => "reject",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_full_and_a_read_only_replica_are_waited_out_and_a_script_error_is_not() -> anyhow::Result<()> {
    let redis_server = PrivateRedis::start(&["--appendonly", "no"])?;
    let client = redis::Client::open(redis_server.url.as_str())?;
    let mut con = redis_server
        .when_up(|| client.get_multiplexed_async_connection())
        .await?;

    // A script that fails on the data (a bug) is fatal: retrying cannot fix it.
    let _: () = redis::cmd("SET").arg("text").arg("abc").query_async(&mut con).await?;
    let script_error = redis::Script::new("return redis.call('INCR', KEYS[1])")
        .key("text")
        .invoke_async::<i64>(&mut con)
        .await
        .map(|_| ());
    assert_eq!(kind(script_error), "fatal");

    // Memory full: OOM until eviction or an operator frees some.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut con)
        .await?;
    let oom = redis::cmd("SET").arg("k").arg("v").query_async::<()>(&mut con).await;
    assert_eq!(oom.as_ref().err().and_then(|e| e.code()), Some("OOM"), "{oom:?}");
    assert_eq!(kind(oom), "transient");
    let oom_in_script = redis::Script::new("return redis.call('SET', KEYS[1], 'v')")
        .key("k2")
        .invoke_async::<()>(&mut con)
        .await;
    assert_eq!(kind(oom_in_script), "transient", "also from inside a script");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut con)
        .await?;

    // A primary demoted to a replica (a failover): READONLY until clients follow the new primary.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg("1")
        .query_async(&mut con)
        .await?;
    let read_only = redis::cmd("SET").arg("k").arg("v").query_async::<()>(&mut con).await;
    assert_eq!(
        read_only.as_ref().err().and_then(|e| e.code()),
        Some("READONLY"),
        "{read_only:?}"
    );
    assert_eq!(kind(read_only), "transient");
    Ok(())
}
