//! A Redis server of a test's own, on a free loopback port, for what the shared dev-stack Redis
//! must not see (its settings, its memory limit, its role changed).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct PrivateRedis {
    child: Child,
    pub url: String,
    /// Its working directory (where an AOF goes), removed with it.
    dir: PathBuf,
}

impl PrivateRedis {
    /// Starts `redis-server` without snapshots, with `settings` on its command line.
    pub fn start(settings: &[&str]) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let port = port.to_string();
        let dir = std::env::temp_dir().join(format!("forfall-private-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .arg("--dir")
            .arg(&dir)
            .args(settings)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start redis-server (the dev stack installs it): {e}"))?;
        Ok(Self {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            dir,
        })
    }

    /// Connects with `connect` once the server listens (it takes a moment to start).
    pub async fn when_up<T, E, Fut>(&self, mut connect: impl FnMut() -> Fut) -> anyhow::Result<T>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
        E: Into<anyhow::Error>,
    {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match connect().await {
                Ok(c) => return Ok(c),
                Err(_) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
