//! Request and response shapes of the Arrakis API, typed the way callers want them: status as
//! an enum, command results with an exit code, empty strings as `None`.
//!
//! Wire quirks handled here (BEHAVIOR.md §1, §2.9, §2.11): `ip` carries a CIDR suffix, ports
//! are decimal strings, status is uppercase, `error` is `""` on success.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    /// RFC 3339 UTC, to the second.
    pub timestamp: String,
}

/// `POST /v1/vms`. Only `vm_name` is required; empty paths mean the server's defaults.
/// With `snapshot_id` set this is a restore and every other field but `vm_name` is ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartVmRequest {
    pub vm_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Accepted and ignored by the server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
}

impl StartVmRequest {
    /// A fresh boot with the server's default kernel and images.
    pub fn new(vm_name: impl Into<String>) -> Self {
        Self { vm_name: vm_name.into(), ..Self::default() }
    }

    /// A restore of `snapshot_id` under `vm_name` (which must be the snapshot's source VM,
    /// destroyed first; BEHAVIOR.md §3.5).
    pub fn restore(vm_name: impl Into<String>, snapshot_id: impl Into<String>) -> Self {
        Self { vm_name: vm_name.into(), snapshot_id: Some(snapshot_id.into()), ..Self::default() }
    }
}

/// A VM as `GET /v1/vms[/{name}]` and `POST /v1/vms` report it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmInfo {
    pub vm_name: String,
    pub status: VmStatus,
    /// As sent, with the CIDR suffix (`10.20.1.2/24`); see [`VmInfo::ip_address`].
    #[serde(default)]
    pub ip: String,
    #[serde(default)]
    pub tap_device_name: String,
    #[serde(default)]
    pub port_forwards: Vec<PortForward>,
}

impl VmInfo {
    /// The guest address without its `/NN` suffix, ready to connect to.
    pub fn ip_address(&self) -> &str {
        self.ip.split_once('/').map_or(self.ip.as_str(), |(addr, _)| addr)
    }
}

/// A VM's status. The server reports only the first three; anything else is kept verbatim.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum VmStatus {
    Running,
    Paused,
    Stopped,
    Other(String),
}

impl VmStatus {
    pub fn as_str(&self) -> &str {
        match self {
            VmStatus::Running => "RUNNING",
            VmStatus::Paused => "PAUSED",
            VmStatus::Stopped => "STOPPED",
            VmStatus::Other(s) => s,
        }
    }
}

impl From<&str> for VmStatus {
    fn from(s: &str) -> Self {
        match s {
            "RUNNING" => VmStatus::Running,
            "PAUSED" => VmStatus::Paused,
            "STOPPED" => VmStatus::Stopped,
            other => VmStatus::Other(other.to_string()),
        }
    }
}

impl std::fmt::Display for VmStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for VmStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for VmStatus {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(VmStatus::from(s.as_str()))
    }
}

/// A host port forwarded to a guest port; both are decimal strings on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortForward {
    pub host_port: String,
    pub guest_port: String,
    #[serde(default)]
    pub description: String,
}

impl PortForward {
    pub fn host_port_number(&self) -> Option<u16> {
        self.host_port.parse().ok()
    }

    pub fn guest_port_number(&self) -> Option<u16> {
        self.guest_port.parse().ok()
    }
}

/// The result of `POST /v1/vms/{name}/cmd`. A non-zero exit is a success at the HTTP level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandOutput {
    /// Stdout and stderr interleaved (for a non-blocking call, the "started in background"
    /// notice).
    pub output: String,
    /// The server's `error`, e.g. `exit status 2` or `signal: killed`; `None` when empty.
    pub error: Option<String>,
    /// 0 when `error` is empty, N for `exit status N`, `None` otherwise (killed by a signal).
    pub exit_code: Option<i32>,
}

impl CommandOutput {
    pub(crate) fn from_wire(output: String, error: String) -> Self {
        let exit_code = if error.is_empty() {
            Some(0)
        } else {
            error.strip_prefix("exit status ").and_then(|n| n.trim().parse().ok())
        };
        Self { output, error: (!error.is_empty()).then_some(error), exit_code }
    }

    /// True when the command exited 0.
    pub fn success(&self) -> bool {
        self.exit_code == Some(0)
    }
}

/// One file for `POST /v1/vms/{name}/files`. `content` is written verbatim as text; relative
/// paths land under `/tmp/server_files`, absolute ones as given; parents must exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileUpload {
    pub path: String,
    pub content: String,
}

impl FileUpload {
    pub fn new(path: impl Into<String>, content: impl Into<String>) -> Self {
        Self { path: path.into(), content: content.into() }
    }
}

/// One entry of `GET /v1/vms/{name}/files`: a missing file is an entry with `error` set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDownload {
    /// The requested path, echoed.
    pub path: String,
    pub content: String,
    /// `None` when the server sent `""`.
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_info_decodes_the_wire_shape() {
        let json = r#"{"ip":"10.20.1.2/24","portForwards":[{"description":"gui","guestPort":"5901","hostPort":"3000"}],"status":"RUNNING","tapDeviceName":"tap0","vmName":"foo"}"#;
        let vm: VmInfo = serde_json::from_str(json).unwrap();
        assert_eq!(vm.status, VmStatus::Running);
        assert_eq!(vm.ip, "10.20.1.2/24");
        assert_eq!(vm.ip_address(), "10.20.1.2");
        assert_eq!(vm.port_forwards[0].host_port_number(), Some(3000));
        let odd: VmInfo = serde_json::from_str(r#"{"vmName":"x","status":"CREATED","ip":""}"#).unwrap();
        assert_eq!(odd.status, VmStatus::Other("CREATED".into()));
        assert_eq!(odd.ip_address(), "");
    }

    #[test]
    fn start_request_sends_only_set_camel_case_keys() {
        let req = StartVmRequest { entry_point: Some("/bin/x".into()), ..StartVmRequest::new("a") };
        assert_eq!(serde_json::to_string(&req).unwrap(), r#"{"vmName":"a","entryPoint":"/bin/x"}"#);
        let req = StartVmRequest::restore("a", "s1");
        assert_eq!(serde_json::to_string(&req).unwrap(), r#"{"vmName":"a","snapshotId":"s1"}"#);
    }

    #[test]
    fn command_output_exit_codes() {
        let ok = CommandOutput::from_wire("hi\n".into(), String::new());
        assert_eq!((ok.error.as_deref(), ok.exit_code, ok.success()), (None, Some(0), true));
        let failed = CommandOutput::from_wire(String::new(), "exit status 127".into());
        assert_eq!((failed.error.as_deref(), failed.exit_code), (Some("exit status 127"), Some(127)));
        let killed = CommandOutput::from_wire(String::new(), "signal: killed".into());
        assert_eq!(killed.exit_code, None);
        assert!(!killed.success());
    }
}
