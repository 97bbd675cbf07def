//! `bos serve` child processes of this binary and what the generator reads about them from /proc: resident
//! memory and CPU time (of bos, of PostgreSQL, of the generator itself).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::stack::{free_port, JWT_SECRET};
use super::BenchError;

/// One `bos serve` child process.
pub struct BosProcess {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
    data_dir: PathBuf,
}

impl BosProcess {
    /// Starts `bos serve` with the bench secret and `env` (database, brokers, …); does not wait for it.
    pub fn spawn(env: &[(&str, String)]) -> Result<BosProcess, BenchError> {
        let port = free_port()?;
        let addr: SocketAddr = SocketAddr::from(([127, 0, 0, 1], port));
        let tag = uuid::Uuid::now_v7().simple();
        let log = std::env::temp_dir().join(format!("bos-bench-{port}-{tag}.log"));
        let data_dir = std::env::temp_dir().join(format!("bos-bench-data-{tag}"));
        let file = std::fs::File::create(&log)?;
        // BOS_BENCH_WRAP runs BOS under a profiler, e.g. "valgrind --tool=callgrind --callgrind-out-file=/tmp/cg".
        let wrap = std::env::var("BOS_BENCH_WRAP").unwrap_or_default();
        let mut words = wrap.split_whitespace();
        let mut command = match words.next() {
            Some(program) => {
                let mut c = Command::new(program);
                c.args(words).arg(std::env::current_exe()?);
                c
            }
            None => Command::new(std::env::current_exe()?),
        };
        command
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "warn,sqlx=warn,rdkafka=warn")
            .env("BOS_LISTEN_ADDR", addr.to_string())
            .env("BOS_JWT_SECRET", JWT_SECRET)
            .env("BOS_DATA_DIR", &data_dir)
            .stdout(Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn()?;
        Ok(BosProcess {
            child,
            addr,
            log,
            data_dir,
        })
    }

    /// Starts `bos serve` on a PostgreSQL database and a broker, and waits until `/healthz` answers.
    pub async fn start(database_url: &str, brokers: &str) -> Result<BosProcess, BenchError> {
        Self::start_with(database_url, brokers, &[]).await
    }

    /// `start` with more settings (`extra`, e.g. `BOS_REDIS_URL`).
    pub async fn start_with(
        database_url: &str,
        brokers: &str,
        extra: &[(&str, String)],
    ) -> Result<BosProcess, BenchError> {
        let group = format!("bos-bench-{}", uuid::Uuid::now_v7().simple());
        let mut env = vec![
            ("BOS_DATABASE_URL", database_url.to_owned()),
            ("BOS_KAFKA_BROKERS", brokers.to_owned()),
            ("BOS_KAFKA_GROUP", group),
        ];
        env.extend(extra.iter().cloned());
        let mut process = BosProcess::spawn(&env)?;
        process.wait_healthy(Duration::from_secs(300)).await?;
        Ok(process)
    }

    /// Polls `/healthz` until it reports Redis `ok`, and `/metrics` until the change subscription is live
    /// (`status_cache_coherent 1`): a measure of the production configuration must not start while BOS still
    /// runs without it.
    pub async fn wait_redis_ok(&self, within: Duration) -> Result<(), BenchError> {
        let started = Instant::now();
        let (health, metrics) = (
            format!("http://{}/healthz", self.addr),
            format!("http://{}/metrics", self.addr),
        );
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let mut last = String::from("no answer");
        while started.elapsed() < within {
            if let Ok(response) = client.get(&health).send().await {
                if let Ok(report) = response.json::<serde_json::Value>().await {
                    last = format!("redis {}", report["checks"]["redis"]);
                    if report["checks"]["redis"] == "ok" {
                        let text = match client.get(&metrics).send().await {
                            Ok(response) => response.text().await.unwrap_or_default(),
                            Err(_) => String::new(),
                        };
                        if text.lines().any(|l| l.trim() == "status_cache_coherent 1") {
                            return Ok(());
                        }
                        last = "redis ok, change subscription not live".to_owned();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(BenchError::Setup(format!(
            "bos serve did not report redis ok within {within:?} (last: {last}); log {}",
            self.log.display()
        )))
    }

    /// Polls `/healthz` until it answers 200; returns how long that took from now.
    pub async fn wait_healthy(&mut self, within: Duration) -> Result<Duration, BenchError> {
        let started = Instant::now();
        let url = format!("http://{}/healthz", self.addr);
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BenchError::Setup(format!(
                    "bos serve exited ({status}); log {}",
                    self.log.display()
                )));
            }
            if let Ok(response) = client.get(&url).send().await {
                if response.status().is_success() {
                    return Ok(started.elapsed());
                }
            }
            if started.elapsed() > within {
                return Err(BenchError::Setup(format!(
                    "bos serve not healthy after {within:?}; log {}",
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Under `BOS_BENCH_WRAP=valgrind --tool=callgrind --collect-atstart=no …`: collect only while measuring.
    pub fn profile(&self, on: bool) {
        if std::env::var("BOS_BENCH_WRAP").is_ok_and(|w| w.contains("callgrind")) {
            let _ = Command::new("callgrind_control")
                .arg(if on { "--instr=on" } else { "--instr=off" })
                .arg(self.pid().to_string())
                .stdout(Stdio::null())
                .status();
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident set size from /proc, in KiB (Linux only).
    pub fn rss_kib(&self) -> Result<u64, BenchError> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| BenchError::Setup("no VmRSS in /proc/<pid>/status".into()))
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the process (SIGTERM, then SIGKILL after 30 s, so a profiler around it can write its output) and
    /// removes its data directory; the log is kept for a post-mortem.
    pub fn stop(mut self) {
        let terminated = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        let until = Instant::now() + Duration::from_secs(30);
        while terminated && Instant::now() < until {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

impl Drop for BosProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CPU time (user + system) a process has used, from /proc (Linux; clock ticks assumed 100 Hz, the kernel's
/// USER_HZ on every mainstream distribution).
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) start at the closing parenthesis.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the state.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

/// CPU time of every process named `name` (e.g. the PostgreSQL server and its backends).
pub fn cpu_time_of(name: &str) -> Duration {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .map(cpu_time)
        .sum()
}

/// CPU used by the parts of the stack over one measured stretch.
#[derive(Debug, Clone, Copy)]
pub struct CpuMeter {
    bos: u32,
    start: [Duration; 3],
}

impl CpuMeter {
    pub fn start(bos_pid: u32) -> Self {
        Self {
            bos: bos_pid,
            start: Self::now(bos_pid),
        }
    }

    fn now(bos: u32) -> [Duration; 3] {
        [
            cpu_time(bos),
            cpu_time_of("postgres"),
            cpu_time(std::process::id()),
        ]
    }

    /// "CPU ms per op: bos …, postgres …, generator+broker …" for `ops` operations since `start`.
    pub fn per_op(&self, ops: u64, wall: Duration) -> String {
        let end = Self::now(self.bos);
        let used: Vec<Duration> = end
            .iter()
            .zip(self.start)
            .map(|(e, s)| e.saturating_sub(s))
            .collect();
        let per = |d: Duration| d.as_secs_f64() * 1e3 / ops.max(1) as f64;
        let total: Duration = used.iter().sum();
        format!(
            "CPU per op: bos {:.3} ms, postgres {:.3} ms, generator (+ mock broker) {:.3} ms; machine busy {:.0} % of {} CPUs",
            per(used[0]),
            per(used[1]),
            per(used[2]),
            100.0 * total.as_secs_f64() / wall.as_secs_f64().max(1e-9)
                / std::thread::available_parallelism().map_or(1, |n| n.get()) as f64,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        )
    }
}
