//! Settings, from flags, the environment and a `.env` file, each validated at startup with an
//! error that names the variable.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;
use vm_task_types::validate;

use crate::{images::ImagePolicy, report::REPORT_MAX_BYTES};

/// The consumer worker lists at most this many servers per poll: the edge's own limit, so the
/// two sides cannot drift apart.
pub const MAX_SERVER_NAMES: usize = vm_task_types::Limits::SERVERS_PER_POLL_MAX;

/// The VM task daemon for one bare-metal host. Every flag can also be set by the environment
/// variable named in brackets, or in a `.env` file in the working directory.
#[derive(Debug, Clone, Parser)]
#[command(name = "local-consumer", version, about, max_term_width = 100, args_override_self = true)]
pub struct Cli {
    /// Base URL of the consumer worker (https://vm-consumer-worker.<subdomain>.workers.dev).
    #[arg(long, env = "CONSUMER_WORKER_URL")]
    pub consumer_worker_url: Option<String>,

    /// Base URL of the API worker, where results are reported.
    #[arg(long, env = "API_WORKER_URL")]
    pub api_worker_url: Option<String>,

    /// Bearer token for the consumer worker and for status reports (one of CONSUMER_TOKENS).
    #[arg(long, env = "CONSUMER_TOKEN", hide_env_values = true)]
    pub consumer_token: Option<String>,

    /// The Arrakis REST server on this host (it listens on port 7000 by default).
    #[arg(long, env = "ARRAKIS_URL", default_value = "http://127.0.0.1:7000")]
    pub arrakis_url: String,

    /// Server names this daemon serves, comma-separated: tasks whose targetServer is one of
    /// them run here.
    #[arg(long, env = "SERVER_NAMES", default_value = "production")]
    pub server_names: String,

    /// Identifies this daemon in claims and task timelines. Default: the host name.
    #[arg(long, env = "CONSUMER_ID")]
    pub consumer_id: Option<String>,

    /// Kernel for launch_vm when the task's vmConfig has none.
    #[arg(long, env = "DEFAULT_KERNEL", default_value = "/opt/arrakis/vmlinux.bin")]
    pub default_kernel: String,

    /// Root filesystem for launch_vm when the task's vmConfig has none.
    #[arg(long, env = "DEFAULT_ROOTFS", default_value = "/opt/arrakis/rootfs.ext4")]
    pub default_rootfs: String,

    /// Initramfs for launch_vm when the task's vmConfig has none.
    #[arg(long, env = "DEFAULT_INITRAMFS", default_value = "/opt/arrakis/initramfs.cpio.gz")]
    pub default_initramfs: String,

    /// Directories (comma-separated, absolute) a task's vmConfig kernel, rootfs and initramfs
    /// may come from; anything else is refused before Arrakis sees it. Default: the
    /// directories of DEFAULT_KERNEL, DEFAULT_ROOTFS and DEFAULT_INITRAMFS.
    #[arg(long, env = "ALLOWED_IMAGE_DIRS")]
    pub allowed_image_dirs: Option<String>,

    /// Most bytes of a command's output a report keeps (its head and tail); the report says
    /// `outputTruncated` and the full `outputBytes`. Reports are also cut to fit the API's
    /// 64 KiB body limit whatever this says.
    #[arg(long, env = "MAX_OUTPUT_BYTES", default_value_t = 32 * 1024)]
    pub max_output_bytes: usize,

    /// Tasks on different VMs run at once, up to this many. Tasks on one VM always run one
    /// at a time, in submission order.
    #[arg(long, env = "MAX_CONCURRENCY", default_value_t = 8)]
    pub max_concurrency: usize,

    /// How often a poll carries this host's report for the host registry (`GET /hosts`):
    /// host name, version, concurrency, servers, tasks in flight, Arrakis reachable. Each
    /// report costs two KV writes per server name; 0 never reports.
    #[arg(long, env = "HOST_REPORT_SECONDS", default_value_t = 120)]
    pub host_report_seconds: u64,

    /// Lease asked for on each claim, renewed by heartbeat every third of it.
    #[arg(long, env = "LEASE_SECONDS", default_value_t = 180)]
    pub lease_seconds: u64,

    /// How long one poll may wait at the consumer worker for new tasks (long polling).
    #[arg(long, env = "POLL_WAIT_SECONDS", default_value_t = 25)]
    pub poll_wait_seconds: u64,

    /// First delay after a failed poll; doubles on each failure.
    #[arg(long, env = "POLL_BACKOFF_MIN_MS", default_value_t = 500)]
    pub poll_backoff_min_ms: u64,

    /// Longest delay between polls while the workers are unreachable.
    #[arg(long, env = "POLL_BACKOFF_MAX_MS", default_value_t = 30_000)]
    pub poll_backoff_max_ms: u64,

    /// A full listing every this many seconds, in case a doorbell was missed.
    #[arg(long, env = "RELIST_SECONDS", default_value_t = 300)]
    pub relist_seconds: u64,

    /// Retries of a transient Arrakis failure (network error, timeout, non-domain 5xx).
    #[arg(long, env = "ARRAKIS_RETRIES", default_value_t = 3)]
    pub arrakis_retries: u32,

    /// First retry delay; doubles per retry, with jitter, capped at 10 s.
    #[arg(long, env = "ARRAKIS_RETRY_BASE_MS", default_value_t = 250)]
    pub arrakis_retry_base_ms: u64,

    /// Timeout of POST /v1/vms (start, boot, restore), seconds.
    #[arg(long, env = "ARRAKIS_START_TIMEOUT_SECONDS", default_value_t = 120)]
    pub arrakis_start_timeout_seconds: u64,

    /// Timeout of run_command and file calls, seconds (Arrakis caps blocking commands at 30 s).
    #[arg(long, env = "ARRAKIS_CMD_TIMEOUT_SECONDS", default_value_t = 35)]
    pub arrakis_cmd_timeout_seconds: u64,

    /// Timeout of delete and snapshot calls, seconds.
    #[arg(long, env = "ARRAKIS_LONG_TIMEOUT_SECONDS", default_value_t = 60)]
    pub arrakis_long_timeout_seconds: u64,

    /// Timeout of the other Arrakis calls (health, get, list, state changes), seconds.
    #[arg(long, env = "ARRAKIS_TIMEOUT_SECONDS", default_value_t = 30)]
    pub arrakis_timeout_seconds: u64,

    /// On SIGTERM/SIGINT, how long in-flight tasks may run before the daemon exits anyway.
    #[arg(long, env = "DRAIN_TIMEOUT_SECONDS", default_value_t = 60)]
    pub drain_timeout_seconds: u64,

    /// Address of the /metrics and /healthz endpoint; `off` disables it.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,

    /// Directory of the per-server lock files that stop a second daemon for the same server.
    #[arg(long, env = "LOCK_DIR", default_value = "/run/local-consumer")]
    pub lock_dir: PathBuf,

    /// Log format: `text` (human-readable) or `json`.
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub consumer_worker_url: reqwest::Url,
    pub api_worker_url: reqwest::Url,
    pub consumer_token: String,
    pub arrakis_url: String,
    pub server_names: Vec<String>,
    pub consumer_id: String,
    pub default_kernel: String,
    pub default_rootfs: String,
    pub default_initramfs: String,
    pub images: ImagePolicy,
    pub max_output_bytes: usize,
    pub max_concurrency: usize,
    /// `None`: never report to the host registry.
    pub host_report_every: Option<Duration>,
    pub lease: Duration,
    pub poll_wait: Duration,
    pub poll_backoff_min: Duration,
    pub poll_backoff_max: Duration,
    pub relist_every: Duration,
    pub arrakis_retries: u32,
    pub arrakis_retry_base: Duration,
    pub arrakis_timeouts: arrakis_client::Timeouts,
    pub drain_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub lock_dir: PathBuf,
    pub log_format: LogFormat,
}

/// A setting that is missing or malformed, named by its environment variable.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: {problem}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

fn err(variable: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { variable, problem: problem.into() }
}

fn url(variable: &'static str, value: Option<&str>) -> Result<reqwest::Url, ConfigError> {
    let value = value.filter(|v| !v.trim().is_empty()).ok_or_else(|| err(variable, "is required"))?;
    let parsed =
        reqwest::Url::parse(value.trim()).map_err(|e| err(variable, format!("{value:?} is not a URL: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(err(variable, format!("{value:?} must be an http(s) URL with a host")));
    }
    Ok(parsed)
}

fn positive(variable: &'static str, value: u64) -> Result<u64, ConfigError> {
    if value == 0 {
        return Err(err(variable, "must be greater than 0"));
    }
    Ok(value)
}

fn within(variable: &'static str, value: u64, range: std::ops::RangeInclusive<u64>) -> Result<u64, ConfigError> {
    if !range.contains(&value) {
        return Err(err(variable, format!("must be from {} to {}, got {value}", range.start(), range.end())));
    }
    Ok(value)
}

impl Cli {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let consumer_worker_url = url("CONSUMER_WORKER_URL", self.consumer_worker_url.as_deref())?;
        let api_worker_url = url("API_WORKER_URL", self.api_worker_url.as_deref())?;
        let arrakis_url = url("ARRAKIS_URL", Some(&self.arrakis_url))?.to_string();
        let consumer_token = self
            .consumer_token
            .clone()
            .filter(|t| !t.trim().is_empty())
            .ok_or_else(|| err("CONSUMER_TOKEN", "is required: one of the consumer worker's CONSUMER_TOKENS"))?;
        let mut server_names = Vec::new();
        for name in self.server_names.split(',').map(str::trim) {
            validate::check_server_name("server name", name).map_err(|e| err("SERVER_NAMES", e.to_string()))?;
            if !server_names.iter().any(|s| s == name) {
                server_names.push(name.to_owned());
            }
        }
        if server_names.len() > MAX_SERVER_NAMES {
            return Err(err(
                "SERVER_NAMES",
                format!(
                    "at most {MAX_SERVER_NAMES} server names (the consumer worker lists at most {MAX_SERVER_NAMES} per poll), got {}; run another daemon for the rest",
                    server_names.len()
                ),
            ));
        }
        let consumer_id = match &self.consumer_id {
            Some(id) => id.trim().to_owned(),
            None => host_name(),
        };
        validate::check_segment("consumer id", &consumer_id, 128).map_err(|e| err("CONSUMER_ID", e.to_string()))?;
        for (variable, value) in [
            ("DEFAULT_KERNEL", &self.default_kernel),
            ("DEFAULT_ROOTFS", &self.default_rootfs),
            ("DEFAULT_INITRAMFS", &self.default_initramfs),
        ] {
            validate::check_host_path("path", value).map_err(|e| err(variable, e.to_string()))?;
        }
        let images = match &self.allowed_image_dirs {
            None => ImagePolicy::new(ImagePolicy::directories_of([
                self.default_kernel.as_str(),
                self.default_rootfs.as_str(),
                self.default_initramfs.as_str(),
            ])),
            Some(list) => {
                let mut dirs = Vec::new();
                for dir in list.split(',').map(str::trim).filter(|d| !d.is_empty()) {
                    let path = PathBuf::from(dir);
                    if !path.is_absolute() || path.components().any(|c| c == std::path::Component::ParentDir) {
                        return Err(err(
                            "ALLOWED_IMAGE_DIRS",
                            format!("{dir:?} must be an absolute path without `..`"),
                        ));
                    }
                    if path.parent().is_none() {
                        return Err(err("ALLOWED_IMAGE_DIRS", "`/` would allow every host file, devices included"));
                    }
                    dirs.push(path);
                }
                if dirs.is_empty() {
                    return Err(err("ALLOWED_IMAGE_DIRS", "names no directory"));
                }
                ImagePolicy::new(dirs)
            }
        };
        let max_output_bytes =
            within("MAX_OUTPUT_BYTES", self.max_output_bytes as u64, 256..=(REPORT_MAX_BYTES as u64 - 4096))? as usize;
        if !(1..=1024).contains(&self.max_concurrency) {
            return Err(err("MAX_CONCURRENCY", format!("must be from 1 to 1024, got {}", self.max_concurrency)));
        }
        if !(2..=3600).contains(&self.lease_seconds) {
            return Err(err("LEASE_SECONDS", format!("must be from 2 to 3600, got {}", self.lease_seconds)));
        }
        if self.poll_wait_seconds > 30 {
            return Err(err(
                "POLL_WAIT_SECONDS",
                format!("must be at most 30 (the worker's limit), got {}", self.poll_wait_seconds),
            ));
        }
        if self.poll_backoff_min_ms > self.poll_backoff_max_ms {
            return Err(err("POLL_BACKOFF_MIN_MS", "must not exceed POLL_BACKOFF_MAX_MS"));
        }
        within("POLL_BACKOFF_MAX_MS", self.poll_backoff_max_ms, 1..=600_000)?;
        within("RELIST_SECONDS", self.relist_seconds, 1..=86_400)?;
        within("ARRAKIS_RETRIES", self.arrakis_retries.into(), 0..=20)?;
        within("ARRAKIS_RETRY_BASE_MS", self.arrakis_retry_base_ms, 1..=60_000)?;
        within("DRAIN_TIMEOUT_SECONDS", self.drain_timeout_seconds, 0..=3_600)?;
        for (variable, value) in [
            ("ARRAKIS_START_TIMEOUT_SECONDS", self.arrakis_start_timeout_seconds),
            ("ARRAKIS_CMD_TIMEOUT_SECONDS", self.arrakis_cmd_timeout_seconds),
            ("ARRAKIS_LONG_TIMEOUT_SECONDS", self.arrakis_long_timeout_seconds),
            ("ARRAKIS_TIMEOUT_SECONDS", self.arrakis_timeout_seconds),
        ] {
            within(variable, value, 1..=3_600)?;
        }
        let metrics_addr = match self.metrics_addr.trim() {
            "off" | "" => None,
            addr => Some(addr.parse().map_err(|e| err("METRICS_ADDR", format!("{addr:?} is not host:port: {e}")))?),
        };
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => return Err(err("LOG_FORMAT", format!("must be `text` or `json`, got {other:?}"))),
        };
        let secs = Duration::from_secs;
        let timeouts = arrakis_client::Timeouts {
            start: secs(positive("ARRAKIS_START_TIMEOUT_SECONDS", self.arrakis_start_timeout_seconds)?),
            delete: secs(positive("ARRAKIS_LONG_TIMEOUT_SECONDS", self.arrakis_long_timeout_seconds)?),
            snapshot: secs(self.arrakis_long_timeout_seconds),
            cmd: secs(positive("ARRAKIS_CMD_TIMEOUT_SECONDS", self.arrakis_cmd_timeout_seconds)?),
            files: secs(self.arrakis_cmd_timeout_seconds),
            default: secs(positive("ARRAKIS_TIMEOUT_SECONDS", self.arrakis_timeout_seconds)?),
        };
        Ok(Config {
            consumer_worker_url,
            api_worker_url,
            consumer_token,
            arrakis_url,
            server_names,
            consumer_id,
            default_kernel: self.default_kernel.clone(),
            default_rootfs: self.default_rootfs.clone(),
            default_initramfs: self.default_initramfs.clone(),
            images,
            max_output_bytes,
            max_concurrency: self.max_concurrency,
            host_report_every: Some(secs(self.host_report_seconds)).filter(|d| !d.is_zero()),
            lease: secs(self.lease_seconds),
            poll_wait: secs(self.poll_wait_seconds),
            poll_backoff_min: Duration::from_millis(positive("POLL_BACKOFF_MIN_MS", self.poll_backoff_min_ms)?),
            poll_backoff_max: Duration::from_millis(self.poll_backoff_max_ms),
            relist_every: secs(positive("RELIST_SECONDS", self.relist_seconds)?),
            arrakis_retries: self.arrakis_retries,
            arrakis_retry_base: Duration::from_millis(self.arrakis_retry_base_ms),
            arrakis_timeouts: timeouts,
            drain_timeout: secs(self.drain_timeout_seconds),
            metrics_addr,
            lock_dir: self.lock_dir.clone(),
            log_format,
        })
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local-consumer".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        let mut all = vec![
            "local-consumer",
            "--consumer-worker-url",
            "http://127.0.0.1:8787/consumer",
            "--api-worker-url",
            "http://127.0.0.1:8787",
            "--consumer-token",
            "t",
        ];
        all.extend_from_slice(args);
        Cli::parse_from(all)
    }

    #[test]
    fn defaults_validate_and_match_the_seed() {
        let config = cli(&[]).validate().unwrap();
        assert_eq!(config.arrakis_url, "http://127.0.0.1:7000/");
        assert_eq!(config.default_kernel, "/opt/arrakis/vmlinux.bin");
        assert_eq!(config.default_rootfs, "/opt/arrakis/rootfs.ext4");
        assert_eq!(config.default_initramfs, "/opt/arrakis/initramfs.cpio.gz");
        assert_eq!(config.server_names, ["production"]);
        assert!(!config.consumer_id.is_empty());
        assert_eq!(config.images.allowed(), [PathBuf::from("/opt/arrakis")]);
        assert_eq!(config.max_output_bytes, 32 * 1024);
    }

    #[test]
    fn issue_11_more_than_32_server_names_fail_at_startup() {
        let names: Vec<String> = (1..=33).map(|i| format!("s{i}")).collect();
        let e = cli(&["--server-names", &names.join(",")]).validate().unwrap_err();
        assert_eq!(e.variable, "SERVER_NAMES");
        assert!(e.to_string().contains("at most 32"), "{e}");
        let config = cli(&["--server-names", &names[..32].join(",")]).validate().unwrap();
        assert_eq!(config.server_names.len(), 32);
    }

    #[test]
    fn errors_name_the_variable() {
        let cases: [(&[&str], &str); 6] = [
            (&["--consumer-worker-url", "ftp://x"], "CONSUMER_WORKER_URL"),
            (&["--arrakis-url", "not a url"], "ARRAKIS_URL"),
            (&["--server-names", "prod,bad name"], "SERVER_NAMES"),
            (&["--max-concurrency", "0"], "MAX_CONCURRENCY"),
            (&["--metrics-addr", "localhost"], "METRICS_ADDR"),
            (&["--log-format", "xml"], "LOG_FORMAT"),
        ];
        for (args, variable) in cases {
            let e = cli(args).validate().unwrap_err();
            assert_eq!(e.variable, variable, "{e}");
        }
        let more: [(&[&str], &str); 9] = [
            (&["--max-output-bytes", "10"], "MAX_OUTPUT_BYTES"),
            (&["--max-output-bytes", "100000"], "MAX_OUTPUT_BYTES"),
            (&["--allowed-image-dirs", "images"], "ALLOWED_IMAGE_DIRS"),
            (&["--allowed-image-dirs", "/"], "ALLOWED_IMAGE_DIRS"),
            (&["--allowed-image-dirs", "/opt/../etc"], "ALLOWED_IMAGE_DIRS"),
            (&["--arrakis-retries", "1000"], "ARRAKIS_RETRIES"),
            (&["--arrakis-retry-base-ms", "0"], "ARRAKIS_RETRY_BASE_MS"),
            (&["--poll-backoff-max-ms", "86400000"], "POLL_BACKOFF_MAX_MS"),
            (&["--arrakis-cmd-timeout-seconds", "999999"], "ARRAKIS_CMD_TIMEOUT_SECONDS"),
        ];
        for (args, variable) in more {
            let e = cli(args).validate().unwrap_err();
            assert_eq!(e.variable, variable, "{e}");
        }
        let missing = Cli::parse_from(["local-consumer", "--api-worker-url", "http://x"]).validate().unwrap_err();
        assert_eq!(missing.variable, "CONSUMER_WORKER_URL");
        assert!(missing.to_string().contains("is required"));
    }
}
