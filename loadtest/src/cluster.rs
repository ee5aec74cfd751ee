//! A real local Tally cluster: a throwaway PostgreSQL (or a given URL), the API, two
//! generator+sweeper candidates and N workers, each a separate `tally` process with its own
//! log file.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tally::pgtemp::{ClusterOptions, TempCluster};
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Api,
    Control,
    Worker,
}

impl Role {
    fn roles(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Control => "generator,sweeper",
            Role::Worker => "worker",
        }
    }
}

pub struct Proc {
    pub role: Role,
    pub name: String,
    pub child: Child,
    /// Where a worker connects to PostgreSQL when it goes through a proxy (net-cut).
    pub database_url: String,
    /// A worker's Prometheus endpoint (claim latency for the soak); None for other roles.
    pub metrics_url: Option<String>,
}

impl Proc {
    pub fn pid(&self) -> Option<i32> {
        self.child.id().map(|p| p as i32)
    }

    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: signalling a child process we started.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}

pub struct Cluster {
    pub pg: Option<Arc<TempCluster>>,
    pub url: String,
    pub bin: PathBuf,
    pub api_url: String,
    pub api_key: String,
    pub procs: Vec<Proc>,
    logs: PathBuf,
    env: Vec<(String, String)>,
    spawned: usize,
}

/// `tally` next to this executable (`cargo build --release --workspace` builds both).
pub fn default_bin() -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let bin = me.with_file_name("tally");
    if !bin.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --workspace`, or pass --tally-bin",
            bin.display()
        );
    }
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Cluster {
    /// Starts PostgreSQL (durable: fsync and synchronous commit on, so a crash loses only
    /// what was never acknowledged) unless `url` is given, and migrates it.
    pub async fn start(
        url: Option<String>,
        bin: PathBuf,
        out: &Path,
        env: Vec<(String, String)>,
        pg_settings: Vec<(String, String)>,
    ) -> anyhow::Result<Cluster> {
        let (pg, url) = match url {
            Some(u) => (None, u),
            None => {
                let mut extra_settings = vec![
                    ("max_connections".into(), "300".into()),
                    // Statements per order (small-orders); the harness's own sessions switch
                    // tracking off.
                    (
                        "shared_preload_libraries".into(),
                        "pg_stat_statements".into(),
                    ),
                ];
                extra_settings.extend(pg_settings);
                let pg = tokio::task::spawn_blocking(move || {
                    TempCluster::start(ClusterOptions {
                        durable: true,
                        extra_settings,
                        ..ClusterOptions::default()
                    })
                })
                .await??;
                let url = pg.url("postgres");
                (Some(Arc::new(pg)), url)
            }
        };
        let logs = out.join("logs");
        std::fs::create_dir_all(&logs)?;
        let status = Command::new(&bin)
            .arg("migrate")
            .env("TALLY_DATABASE_URL", &url)
            .status()
            .await
            .context("running tally migrate")?;
        if !status.success() {
            bail!("tally migrate failed: {status}");
        }
        let api_port = free_port()?;
        Ok(Cluster {
            pg,
            url,
            bin,
            api_url: format!("http://127.0.0.1:{api_port}"),
            api_key: format!("loadtest-admin-{}", uuid::Uuid::new_v4().simple()),
            procs: Vec::new(),
            logs,
            env,
            spawned: 0,
        })
    }

    pub fn spawn(&mut self, role: Role, database_url: Option<String>) -> anyhow::Result<usize> {
        self.spawned += 1;
        let name = format!("{}-{}", role.roles().replace(',', "+"), self.spawned);
        let log = std::fs::File::create(self.logs.join(format!("{name}.log")))?;
        let database_url = database_url.unwrap_or_else(|| self.url.clone());
        let mut cmd = Command::new(&self.bin);
        let metrics_addr = match role {
            Role::Worker => Some(format!("127.0.0.1:{}", free_port()?)),
            _ => None,
        };
        cmd.args(["serve", "--roles", role.roles()])
            .env("TALLY_DATABASE_URL", &database_url)
            .env(
                "TALLY_METRICS_ADDR",
                metrics_addr.as_deref().unwrap_or("off"),
            )
            .env("TALLY_ADMIN_API_KEY", &self.api_key)
            .env("RUST_LOG", "warn,tally=info")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        if role == Role::Api {
            cmd.env("TALLY_API_ADDR", self.api_url.trim_start_matches("http://"));
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().context("spawning tally")?;
        self.procs.push(Proc {
            role,
            name,
            child,
            database_url,
            metrics_url: metrics_addr.map(|a| format!("http://{a}/metrics")),
        });
        Ok(self.procs.len() - 1)
    }

    pub fn indices(&self, role: Role) -> Vec<usize> {
        (0..self.procs.len())
            .filter(|&i| self.procs[i].role == role)
            .collect()
    }

    /// SIGKILLs process `i`, reaps it and starts a replacement with the same role and URL.
    pub async fn kill_and_replace(&mut self, i: usize) -> anyhow::Result<usize> {
        let mut p = self.procs.remove(i);
        p.child.start_kill()?;
        let _ = p.child.wait().await;
        self.spawn(p.role, Some(p.database_url))
    }

    /// Waits until the API answers /readyz.
    pub async fn wait_ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = client.get(format!("{}/readyz", self.api_url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "the API never became ready (logs in {})",
                    self.logs.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM to everyone, then wait (SIGKILL after 30 s).
    pub async fn stop(&mut self) {
        for p in &self.procs {
            p.signal(libc::SIGCONT);
            p.signal(libc::SIGTERM);
        }
        for p in &mut self.procs {
            if tokio::time::timeout(Duration::from_secs(30), p.child.wait())
                .await
                .is_err()
            {
                let _ = p.child.start_kill();
                let _ = p.child.wait().await;
            }
        }
        self.procs.clear();
    }
}
