//! Servers of a test's own on loopback: free ports, and a Redis server for faults the shared
//! dev stack's Redis must not see (a crash and a restart from its last snapshot).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A free port on loopback for a server started later (bound and released).
///
/// Chosen below the kernel's ephemeral range: a port from that range (what binding port 0
/// gives) can be taken by any outgoing connection between choosing and binding, and a run
/// opens thousands of them, so a restarted service would now and then find its port in use.
pub fn free_port() -> anyhow::Result<u16> {
    use rand::Rng;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    let (low, high) = (10_000, ephemeral_low.max(10_001));
    let mut rng = rand::rng();
    for _ in 0..1_000 {
        let port = rng.random_range(low..high);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not listen on 127.0.0.1:{port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A `redis-server` of the test's own that keeps its snapshot (`dump.rdb`) in `dir`. Only an
/// explicit [`RedisServer::save`] writes one, as a scheduled snapshot would.
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl RedisServer {
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let port = free_port()?;
        let child = Self::spawn(port, dir)?;
        wait_port(port, "redis-server").await?;
        Ok(Self {
            child,
            port,
            dir: dir.to_owned(),
        })
    }

    fn spawn(port: u16, dir: &Path) -> anyhow::Result<Child> {
        Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dbfilename", "dump.rdb"])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start redis-server: {e}"))
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Writes a snapshot of everything now (`SAVE`).
    pub async fn save(&self) -> anyhow::Result<()> {
        let mut redis = redis::Client::open(self.url())?
            .get_multiplexed_async_connection()
            .await?;
        let _: () = redis::cmd("SAVE").query_async(&mut redis).await?;
        Ok(())
    }

    /// A crash (`kill -9`: nothing written since the last snapshot survives), then a start
    /// on the same port that loads the last snapshot.
    pub async fn crash_and_restart(&mut self) -> anyhow::Result<()> {
        self.child.start_kill()?;
        self.child.wait().await?;
        self.child = Self::spawn(self.port, &self.dir)?;
        wait_port(self.port, "redis-server").await?;
        // Loading a snapshot answers LOADING until done.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ping: anyhow::Result<String> = async {
                let mut redis = redis::Client::open(self.url())?
                    .get_multiplexed_async_connection()
                    .await?;
                Ok(redis::cmd("PING").query_async(&mut redis).await?)
            }
            .await;
            match ping {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.context("redis-server did not come back")),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
