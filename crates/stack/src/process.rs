//! One child process of the stack: spawned in its own process group with its output in a log
//! file, stopped by signalling the whole group, and killed with its group on drop.
//!
//! Groups matter because `wrangler` is a Node process that forks `workerd`: signalling only
//! wrangler's pid can leave workerd holding the ports and the persisted state.

use std::{
    fs::{File, OpenOptions},
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use nix::{
    errno::Errno,
    sys::signal::{killpg, Signal},
    unistd::Pid,
};
use tokio::process::{Child, Command};

/// How many log lines an error about a child quotes.
pub(crate) const LOG_TAIL_LINES: usize = 40;

#[derive(Debug)]
pub(crate) struct Proc {
    name: &'static str,
    child: Child,
    /// The child's pid, which is also its process group id (`process_group(0)`).
    pgid: Pid,
    log: PathBuf,
    /// Set once the group has been killed and the leader reaped, so that drop does not signal
    /// a group id the kernel may since have handed to an unrelated process.
    finished: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd` as the leader of a new process group, appending stdout and stderr to `log`.
    pub(crate) fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Self> {
        let file = open_log(log)?;
        let err = file.try_clone().with_context(|| format!("could not reopen {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0)
            // A backstop for the leader if the group signal in `Drop` somehow misses it.
            .kill_on_drop(true);
        let child =
            cmd.spawn().with_context(|| format!("could not start {name} ({:?})", cmd.as_std().get_program()))?;
        let pid = child.id().context("a just-spawned child has a pid")?;
        let pgid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
        tracing::debug!(name, pid, log = %log.display(), "started");
        Ok(Self { name, child, pgid, log: log.to_owned(), finished: None })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// The leader's pid (also the group id).
    pub(crate) fn pid(&self) -> u32 {
        self.pgid.as_raw().unsigned_abs()
    }

    pub(crate) fn log(&self) -> &Path {
        &self.log
    }

    /// The exit status if the leader has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        if self.finished.is_some() {
            return self.finished;
        }
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal` to the whole group. A group that is already gone is not an error.
    pub(crate) fn signal(&self, signal: Signal) -> Result<()> {
        if self.finished.is_some() {
            return Ok(());
        }
        match killpg(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("could not send {signal} to {}", self.name)),
        }
    }

    /// Sends `signal` to the leader only, for programs (the daemon) whose own shutdown logic
    /// should run before anything else in the group is touched.
    pub(crate) fn signal_leader(&self, signal: Signal) -> Result<()> {
        if self.finished.is_some() {
            return Ok(());
        }
        match nix::sys::signal::kill(self.pgid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("could not send {signal} to {}", self.name)),
        }
    }

    /// Sends `signal` (to the leader or the group), waits up to `grace` for the leader to
    /// exit, then kills the group. Returns the leader's exit status.
    pub(crate) async fn stop(&mut self, signal: Signal, whole_group: bool, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.finished {
            return Ok(status);
        }
        if whole_group {
            self.signal(signal)?;
        } else {
            self.signal_leader(signal)?;
        }
        let status = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.with_context(|| format!("could not wait for {}", self.name))?,
            Err(_) => {
                tracing::warn!(name = self.name, ?grace, "did not exit in time; killing its process group");
                self.signal(Signal::SIGKILL)?;
                self.child.wait().await.with_context(|| format!("could not wait for {}", self.name))?
            }
        };
        // Whatever the leader left behind (workerd under wrangler) goes with it.
        self.signal(Signal::SIGKILL)?;
        self.finished = Some(status);
        Ok(status)
    }

    /// Kills the group outright and reaps the leader.
    pub(crate) async fn kill(&mut self) -> Result<ExitStatus> {
        self.stop(Signal::SIGKILL, true, Duration::from_secs(10)).await
    }

    /// The last [`LOG_TAIL_LINES`] lines of the child's log, for error messages.
    pub(crate) fn log_tail(&self) -> String {
        log_tail(&self.log, LOG_TAIL_LINES)
    }

    /// An error when the leader has exited, quoting its log; `Ok` while it runs.
    pub(crate) fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.exited() {
            bail!("{} exited with {status}; last lines of {}:\n{}", self.name, self.log.display(), self.log_tail());
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.finished.is_none() {
            // Synchronous on purpose: drop cannot await, and a leaked workerd would keep its
            // ports and make the next stack fail to start.
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

fn open_log(path: &Path) -> Result<File> {
    // Appending keeps the earlier run's lines when a process is restarted by a fault test.
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("could not open log {}", path.display()))
}

/// The last `n` lines of a text file; empty if it cannot be read.
pub(crate) fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("stack-log-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.log");
        std::fs::write(&path, (1..=50).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        let tail = log_tail(&path, 3);
        assert_eq!(tail, "line 48\nline 49\nline 50");
        assert_eq!(log_tail(&dir.join("missing.log"), 3), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn stopping_kills_the_whole_group() {
        let dir = std::env::temp_dir().join(format!("stack-group-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut cmd = Command::new("sh");
        // A grandchild that ignores nothing: it must die with the group, as workerd must.
        cmd.args(["-c", "sleep 300 & echo $! > grandchild.pid; wait"]).current_dir(&dir);
        let mut proc = Proc::spawn("sh", cmd, &dir.join("sh.log")).unwrap();
        let pid_file = dir.join("grandchild.pid");
        let grandchild = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse::<i32>().ok()) {
                break Pid::from_raw(pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let status = proc.stop(Signal::SIGTERM, true, Duration::from_secs(5)).await.unwrap();
        assert!(!status.success());
        // The grandchild is either gone or a zombie awaiting init; give init a moment.
        let mut alive = true;
        for _ in 0..100 {
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                alive = false;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive, "grandchild {grandchild} survived");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
