//! The gateway under test, as a child process, and what `/proc` says about it.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running gateway.
pub struct Gateway {
    child: Child,
    /// Where it listens.
    pub address: SocketAddr,
}

impl Gateway {
    /// Starts `<binary> serve --listen 127.0.0.1:0 <args>` with `env`.
    pub async fn start(binary: &Path, args: &[String], env: &[(String, String)]) -> anyhow::Result<Self> {
        Self::start_on(binary, args, env, None).await
    }

    /// [`Gateway::start`], confined to CPU `cpu` when given one (its runtime then sizes itself
    /// to that one core).
    pub async fn start_on(
        binary: &Path,
        args: &[String],
        env: &[(String, String)],
        cpu: Option<&str>,
    ) -> anyhow::Result<Self> {
        let mut child = command(binary, cpu)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env_remove("DATABASE_URL")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CHANGEGATE_LOG", "warn")
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
        let address = loop {
            let line = lines.next_line().await?.context("the gateway exited before listening")?;
            if let Some(url) = line.strip_prefix("listening on http://") {
                break url.parse()?;
            }
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self { child, address })
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        rss_kib(self.pid())
    }
}

/// A command running `program`, under `taskset -c <cpu>` when given a CPU (`taskset` execs the
/// program: the child's pid is the program's).
pub fn command(program: impl AsRef<OsStr>, cpu: Option<&str>) -> Command {
    let Some(cpu) = cpu else { return Command::new(program) };
    let mut command = Command::new("taskset");
    command.args(["-c", cpu]).arg(program);
    command
}

/// Confines every thread of this process to `cpus` (a `taskset` list, e.g. `1-3`).
pub fn pin_self(cpus: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status()
        .context("running taskset (util-linux)")?;
    anyhow::ensure!(status.success(), "taskset could not pin the bench to CPUs {cpus}");
    Ok(())
}

/// Resident memory of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Fields of `/proc/<pid>/stat` after the parenthesised command name.
fn stat_fields(pid: u32) -> Vec<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    rest.split_whitespace().map(str::to_owned).collect()
}

/// CPU time process `pid` used so far (user + system), in clock ticks.
pub fn cpu_ticks(pid: u32) -> u64 {
    let fields = stat_fields(pid);
    // utime and stime are the 12th and 13th fields after the name.
    let get = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

/// Whether process `pid` has exited and awaits its parent (state `Z`).
pub fn is_zombie(pid: u32) -> bool {
    stat_fields(pid).first().is_some_and(|state| state == "Z")
}

/// The processes whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&child| stat_fields(child).get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid))
        .collect()
}

/// The release binary next to this one, unless told otherwise.
pub fn default_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("changegate")))
        .unwrap_or_else(|| PathBuf::from("target/release/changegate"))
}

/// The machine, for the record: cores, memory, kernel.
pub fn machine() -> String {
    // The machine's, not this process's share (`compare --pin` confines the bench to some).
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {} GiB, Linux {}", mem_kib / 1024 / 1024, kernel.trim())
}
