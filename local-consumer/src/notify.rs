//! systemd's notify protocol (`sd_notify(3)`): readiness, watchdog pings, stopping.
//! A no-op when the daemon does not run under a `Type=notify` unit.

use std::{os::unix::net::UnixDatagram, time::Duration};

#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// Half of `WatchdogSec`, when the unit sets one.
    pub watchdog_every: Option<Duration>,
}

impl Notifier {
    /// Tells nobody: for tests and for running outside systemd.
    pub fn disabled() -> Self {
        Self { socket: None, watchdog_every: None }
    }

    pub fn from_env() -> Self {
        let socket = std::env::var("NOTIFY_SOCKET").ok().and_then(|path| {
            let addr = if let Some(name) = path.strip_prefix('@') {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                std::os::unix::net::SocketAddr::from_pathname(&path).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|_| std::env::var("WATCHDOG_PID").map_or(true, |pid| pid == std::process::id().to_string()))
            .map(|usec| Duration::from_micros(usec / 2));
        Self { socket, watchdog_every }
    }

    fn send(&self, state: &str) {
        if let Some((socket, addr)) = &self.socket {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, "could not notify systemd");
            }
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&format!("READY=1\nSTATUS={status}"));
    }

    pub fn status(&self, status: &str) {
        self.send(&format!("STATUS={status}"));
    }

    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    pub fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=draining in-flight tasks");
    }
}
