//! Simulator options and the operation names they are keyed by, shared by the CLI, the
//! `/_sim/config` control route and in-process tests.
//!
//! Durations travel as milliseconds in JSON and as `200ms` / `1.5s` / `2m` strings on the
//! command line, so one parser serves both the flags and humans.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One Arrakis operation, as named in latencies, hangs, fail-next and the request log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Health,
    List,
    Start,
    Get,
    Stop,
    Pause,
    Resume,
    /// A PATCH whose body names no valid status (it gets a 400).
    Patch,
    Delete,
    /// `DELETE /v1/vms`.
    DeleteAll,
    Snapshot,
    Cmd,
    Upload,
    Download,
}

impl Op {
    pub const ALL: [Op; 14] = [
        Op::Health,
        Op::List,
        Op::Start,
        Op::Get,
        Op::Stop,
        Op::Pause,
        Op::Resume,
        Op::Patch,
        Op::Delete,
        Op::DeleteAll,
        Op::Snapshot,
        Op::Cmd,
        Op::Upload,
        Op::Download,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Health => "health",
            Op::List => "list",
            Op::Start => "start",
            Op::Get => "get",
            Op::Stop => "stop",
            Op::Pause => "pause",
            Op::Resume => "resume",
            Op::Patch => "patch",
            Op::Delete => "delete",
            Op::DeleteAll => "delete_all",
            Op::Snapshot => "snapshot",
            Op::Cmd => "cmd",
            Op::Upload => "upload",
            Op::Download => "download",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim().replace('-', "_");
        Op::ALL.into_iter().find(|op| op.name() == wanted).ok_or_else(|| {
            let names: Vec<&str> = Op::ALL.iter().map(|op| op.name()).collect();
            format!("unknown operation {s:?}; expected one of {}", names.join(", "))
        })
    }
}

/// Everything that shapes the simulator's timing and failures. `Default` is the real
/// server's timing (30 s proxy timeout, real-time `sleep`) with no faults.
#[derive(Debug, Clone, PartialEq)]
pub struct SimConfig {
    /// Extra delay per operation. For `start` it is the boot time: the VM is already
    /// registered (and listed RUNNING) while it elapses, as on the real server. For
    /// `snapshot` the VM reads PAUSED meanwhile. Other operations wait before taking effect.
    pub latency: BTreeMap<Op, Duration>,
    /// Probability in [0, 1] that a request gets an injected 500 before it takes effect.
    pub error_rate: f64,
    /// Seed of the fault PRNG (and of the list shuffle); same seed, same fault sequence.
    pub seed: u64,
    /// Requests for these operations sleep for `hang_for` before being handled.
    pub hang_ops: BTreeSet<Op>,
    pub hang_for: Duration,
    /// How long cmd and files calls against a PAUSED or STOPPED VM (or a blocking command that
    /// runs too long) wait before the server's 500; 30 s on the real server.
    pub proxy_timeout: Duration,
    /// Multiplies guest `sleep` durations, so tests can run `sleep 30` in 30 ms.
    pub time_scale: f64,
    /// Host ports handed out to port forwards; never freed until a restart.
    pub port_range: (u16, u16),
    /// Shuffle `GET /v1/vms` like Go's map iteration (on by default).
    pub shuffle_list: bool,
}

/// "Effectively forever" for a hang, yet far below tokio's timer limit.
pub const DEFAULT_HANG: Duration = Duration::from_secs(24 * 3600);

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            latency: BTreeMap::new(),
            error_rate: 0.0,
            seed: 0,
            hang_ops: BTreeSet::new(),
            hang_for: DEFAULT_HANG,
            proxy_timeout: Duration::from_secs(30),
            time_scale: 1.0,
            port_range: (3000, 6000),
            shuffle_list: true,
        }
    }
}

impl SimConfig {
    /// Defaults for fast tests: a 50 ms proxy timeout and guest `sleep` scaled by 1/1000.
    pub fn for_tests() -> Self {
        Self { proxy_timeout: Duration::from_millis(50), time_scale: 0.001, ..Self::default() }
    }

    pub fn with_latency(mut self, op: Op, delay: Duration) -> Self {
        self.latency.insert(op, delay);
        self
    }

    pub fn with_error_rate(mut self, rate: f64, seed: u64) -> Self {
        self.error_rate = rate.clamp(0.0, 1.0);
        self.seed = seed;
        self
    }

    pub fn with_hang(mut self, ops: impl IntoIterator<Item = Op>, duration: Duration) -> Self {
        self.hang_ops = ops.into_iter().collect();
        self.hang_for = duration;
        self
    }

    pub fn with_proxy_timeout(mut self, timeout: Duration) -> Self {
        self.proxy_timeout = timeout;
        self
    }

    pub fn with_time_scale(mut self, scale: f64) -> Self {
        self.time_scale = scale.max(0.0);
        self
    }

    pub fn with_port_range(mut self, first: u16, last: u16) -> Self {
        self.port_range = (first, last);
        self
    }

    pub fn with_shuffle_list(mut self, shuffle: bool) -> Self {
        self.shuffle_list = shuffle;
        self
    }

    pub fn latency_of(&self, op: Op) -> Duration {
        self.latency.get(&op).copied().unwrap_or_default()
    }

    /// The JSON form served by `GET /_sim/config`.
    pub fn view(&self) -> ConfigView {
        ConfigView {
            latency_ms: self.latency.iter().map(|(op, d)| (*op, millis(*d))).collect(),
            error_rate: self.error_rate,
            seed: self.seed,
            hang_ops: self.hang_ops.iter().copied().collect(),
            hang_for_ms: millis(self.hang_for),
            proxy_timeout_ms: millis(self.proxy_timeout),
            time_scale: self.time_scale,
            port_range: [self.port_range.0, self.port_range.1],
            shuffle_list: self.shuffle_list,
        }
    }

    /// Applies a `PUT /_sim/config` body; absent fields keep their value. `latencyMs` replaces
    /// the whole latency map.
    pub fn apply(&mut self, patch: &ConfigPatch) -> Result<(), String> {
        if let Some(rate) = patch.error_rate {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("errorRate must be within [0, 1], got {rate}"));
            }
            self.error_rate = rate;
        }
        if let Some(scale) = patch.time_scale {
            if !(scale.is_finite() && scale >= 0.0) {
                return Err(format!("timeScale must be a non-negative number, got {scale}"));
            }
            self.time_scale = scale;
        }
        if let Some([first, last]) = patch.port_range {
            if first > last {
                return Err(format!("portRange must be ascending, got {first}-{last}"));
            }
            self.port_range = (first, last);
        }
        if let Some(latency) = &patch.latency_ms {
            self.latency = latency.iter().map(|(op, ms)| (*op, Duration::from_millis(*ms))).collect();
        }
        if let Some(seed) = patch.seed {
            self.seed = seed;
        }
        if let Some(ops) = &patch.hang_ops {
            self.hang_ops = ops.iter().copied().collect();
        }
        if let Some(ms) = patch.hang_for_ms {
            self.hang_for = Duration::from_millis(ms);
        }
        if let Some(ms) = patch.proxy_timeout_ms {
            self.proxy_timeout = Duration::from_millis(ms);
        }
        if let Some(shuffle) = patch.shuffle_list {
            self.shuffle_list = shuffle;
        }
        Ok(())
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `GET /_sim/config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigView {
    pub latency_ms: BTreeMap<Op, u64>,
    pub error_rate: f64,
    pub seed: u64,
    pub hang_ops: Vec<Op>,
    pub hang_for_ms: u64,
    pub proxy_timeout_ms: u64,
    pub time_scale: f64,
    pub port_range: [u16; 2],
    pub shuffle_list: bool,
}

/// `PUT /_sim/config`: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigPatch {
    pub latency_ms: Option<BTreeMap<Op, u64>>,
    pub error_rate: Option<f64>,
    pub seed: Option<u64>,
    pub hang_ops: Option<Vec<Op>>,
    pub hang_for_ms: Option<u64>,
    pub proxy_timeout_ms: Option<u64>,
    pub time_scale: Option<f64>,
    pub port_range: Option<[u16; 2]>,
    pub shuffle_list: Option<bool>,
}

/// Parses `200ms`, `1.5s`, `2m`, `1h`, `250us` or `0`. A unit is required otherwise, since a
/// bare number is ambiguous between seconds and milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("duration {s:?} needs a unit (us, ms, s, m or h)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| format!("duration {s:?}: {number:?} is not a number"))?;
    let secs = match unit {
        "us" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("duration {s:?}: unknown unit {other:?}")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("duration {s:?} must be a finite, non-negative amount"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `start=200ms,cmd=10ms` into per-operation latencies.
pub fn parse_latencies(s: &str) -> Result<BTreeMap<Op, Duration>, String> {
    let mut out = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (op, dur) = item.split_once('=').ok_or_else(|| format!("latency {item:?} must be OP=DURATION"))?;
        out.insert(op.parse::<Op>()?, parse_duration(dur)?);
    }
    Ok(out)
}

/// Parses `cmd,upload` into a set of operations.
pub fn parse_ops(s: &str) -> Result<BTreeSet<Op>, String> {
    s.split(',').map(str::trim).filter(|i| !i.is_empty()).map(str::parse).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn latency_lists_and_ops() {
        let l = parse_latencies("start=200ms, cmd=10ms").unwrap();
        assert_eq!(l[&Op::Start], Duration::from_millis(200));
        assert_eq!(l[&Op::Cmd], Duration::from_millis(10));
        assert!(parse_latencies("start").is_err());
        assert!(parse_latencies("boot=1s").is_err());
        assert_eq!(parse_ops("cmd,delete-all").unwrap(), [Op::Cmd, Op::DeleteAll].into());
    }

    #[test]
    fn patches_apply_partially() {
        let mut c = SimConfig::default();
        let patch: ConfigPatch =
            serde_json::from_str(r#"{"errorRate":0.5,"hangOps":["cmd"],"latencyMs":{"start":5}}"#).unwrap();
        c.apply(&patch).unwrap();
        assert_eq!(c.error_rate, 0.5);
        assert_eq!(c.latency_of(Op::Start), Duration::from_millis(5));
        assert!(c.hang_ops.contains(&Op::Cmd));
        assert_eq!(c.proxy_timeout, Duration::from_secs(30));
        assert!(c.apply(&ConfigPatch { error_rate: Some(2.0), ..Default::default() }).is_err());
    }
}
