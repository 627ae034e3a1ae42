//! The VM operations, each with its own typed payload.
//!
//! On the wire an operation is `{"type": "<kind>", "payload": {...}}` with camelCase keys, as
//! in the original system. [`Operation::parse`] turns a request body into an operation with
//! errors that name the offending field; serde's derive is used for storage.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::validate::{self, FieldError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
pub enum Operation {
    LaunchVm(LaunchVm),
    DeleteVm(VmRef),
    StopVm(VmRef),
    PauseVm(VmRef),
    ResumeVm(VmRef),
    SnapshotVm(SnapshotVm),
    RunCommand(RunCommand),
    UploadFiles(UploadFiles),
    DownloadFiles(DownloadFiles),
}

/// The operation's name without its payload, as it appears in `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    LaunchVm,
    DeleteVm,
    StopVm,
    PauseVm,
    ResumeVm,
    SnapshotVm,
    RunCommand,
    UploadFiles,
    DownloadFiles,
}

impl OperationKind {
    pub const ALL: [OperationKind; 9] = [
        Self::LaunchVm,
        Self::DeleteVm,
        Self::StopVm,
        Self::PauseVm,
        Self::ResumeVm,
        Self::SnapshotVm,
        Self::RunCommand,
        Self::UploadFiles,
        Self::DownloadFiles,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::LaunchVm => "launch_vm",
            Self::DeleteVm => "delete_vm",
            Self::StopVm => "stop_vm",
            Self::PauseVm => "pause_vm",
            Self::ResumeVm => "resume_vm",
            Self::SnapshotVm => "snapshot_vm",
            Self::RunCommand => "run_command",
            Self::UploadFiles => "upload_files",
            Self::DownloadFiles => "download_files",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Human wording for messages: `launch_vm` → "VM launch".
    pub fn describe(self) -> &'static str {
        match self {
            Self::LaunchVm => "VM launch",
            Self::DeleteVm => "VM delete",
            Self::StopVm => "VM stop",
            Self::PauseVm => "VM pause",
            Self::ResumeVm => "VM resume",
            Self::SnapshotVm => "VM snapshot",
            Self::RunCommand => "run command",
            Self::UploadFiles => "file upload",
            Self::DownloadFiles => "file download",
        }
    }

    /// Whether the operation changes the VM's lifecycle state (everything but commands and
    /// files).
    pub fn changes_vm_state(self) -> bool {
        !matches!(self, Self::RunCommand | Self::UploadFiles | Self::DownloadFiles)
    }
}

impl std::fmt::Display for OperationKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Payload of `launch_vm`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchVm {
    pub vm_name: String,
    #[serde(default)]
    pub vm_config: VmConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

/// Boot settings for `launch_vm`. Missing paths fall back to the daemon's defaults. Keys the
/// system does not use (the seed's `memory`, say) are kept so clients can read them back.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<String>,
    /// Restore from this snapshot instead of booting fresh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Payload of the operations that only name a VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmRef {
    pub vm_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

/// Payload of `snapshot_vm`. A missing `snapshotId` is generated at submission, because
/// Arrakis snapshot ids are global and can never be reused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotVm {
    pub vm_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

/// Payload of `run_command`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunCommand {
    pub vm_name: String,
    pub command: String,
    #[serde(default = "default_blocking")]
    pub blocking: bool,
    /// How long the command may run, 1 to 3,600 s (absent: 30, Arrakis's own limit). Above
    /// 30 the daemon runs it detached in the guest and watches it ([`RunCommand::is_long`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

fn default_blocking() -> bool {
    true
}

impl RunCommand {
    /// Arrakis's proxy ends a blocking command call after this long (BEHAVIOR §2.9).
    pub const ARRAKIS_LIMIT_SECONDS: u64 = 30;

    /// The command's time limit in seconds.
    pub fn timeout(&self) -> u64 {
        self.timeout_seconds.unwrap_or(Self::ARRAKIS_LIMIT_SECONDS)
    }

    /// Whether the command outlives one Arrakis call: the daemon runs it detached, watches
    /// it, and a client may cancel it while it runs.
    pub fn is_long(&self) -> bool {
        self.blocking && self.timeout() > Self::ARRAKIS_LIMIT_SECONDS
    }
}

/// One file of `upload_files`: text content, written verbatim (Arrakis does not decode it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileContent {
    /// Relative paths land in `/tmp/server_files`; absolute ones are used as given.
    pub path: String,
    pub content: String,
}

/// Payload of `upload_files`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadFiles {
    pub vm_name: String,
    pub files: Vec<FileContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

/// Payload of `download_files`. Every path resolves under `/tmp/server_files`, absolute
/// ones included (Arrakis's rule, BEHAVIOR §2.11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DownloadFiles {
    pub vm_name: String,
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_server: Option<String>,
}

impl Operation {
    pub fn kind(&self) -> OperationKind {
        match self {
            Self::LaunchVm(_) => OperationKind::LaunchVm,
            Self::DeleteVm(_) => OperationKind::DeleteVm,
            Self::StopVm(_) => OperationKind::StopVm,
            Self::PauseVm(_) => OperationKind::PauseVm,
            Self::ResumeVm(_) => OperationKind::ResumeVm,
            Self::SnapshotVm(_) => OperationKind::SnapshotVm,
            Self::RunCommand(_) => OperationKind::RunCommand,
            Self::UploadFiles(_) => OperationKind::UploadFiles,
            Self::DownloadFiles(_) => OperationKind::DownloadFiles,
        }
    }

    pub fn vm_name(&self) -> &str {
        match self {
            Self::LaunchVm(p) => &p.vm_name,
            Self::DeleteVm(p) | Self::StopVm(p) | Self::PauseVm(p) | Self::ResumeVm(p) => &p.vm_name,
            Self::SnapshotVm(p) => &p.vm_name,
            Self::RunCommand(p) => &p.vm_name,
            Self::UploadFiles(p) => &p.vm_name,
            Self::DownloadFiles(p) => &p.vm_name,
        }
    }

    /// The server the client asked for, if any.
    pub fn requested_server(&self) -> Option<&str> {
        match self {
            Self::LaunchVm(p) => p.target_server.as_deref(),
            Self::DeleteVm(p) | Self::StopVm(p) | Self::PauseVm(p) | Self::ResumeVm(p) => p.target_server.as_deref(),
            Self::SnapshotVm(p) => p.target_server.as_deref(),
            Self::RunCommand(p) => p.target_server.as_deref(),
            Self::UploadFiles(p) => p.target_server.as_deref(),
            Self::DownloadFiles(p) => p.target_server.as_deref(),
        }
    }

    /// Parses and validates a request body of the form `{"type": ..., "payload": {...}}`.
    /// A top-level `callbackUrl` is allowed and left to the API to check (it depends on the
    /// deployment's settings).
    pub fn parse(body: &Value) -> Result<Operation, FieldError> {
        let object = body
            .as_object()
            .ok_or_else(|| FieldError::new("body", "must be a JSON object with `type` and `payload`"))?;
        if let Some(unknown) = object.keys().find(|k| !matches!(k.as_str(), "type" | "payload" | "callbackUrl")) {
            return Err(FieldError::new(
                unknown.as_str(),
                "unknown top-level field; expected only `type`, `payload` and `callbackUrl`",
            ));
        }
        let kind_name = match object.get("type") {
            None | Some(Value::Null) => return Err(FieldError::new("type", "is required")),
            Some(Value::String(s)) => s.as_str(),
            Some(_) => return Err(FieldError::new("type", "must be a string")),
        };
        let kind = OperationKind::parse(kind_name).ok_or_else(|| {
            let known: Vec<&str> = OperationKind::ALL.iter().map(|k| k.as_str()).collect();
            FieldError::new("type", format!("unknown operation {kind_name:?}; expected one of {}", known.join(", ")))
        })?;
        let payload = match object.get("payload") {
            None | Some(Value::Null) => return Err(FieldError::new("payload", "is required")),
            Some(p @ Value::Object(_)) => p.clone(),
            Some(_) => return Err(FieldError::new("payload", "must be a JSON object")),
        };
        let op = match kind {
            OperationKind::LaunchVm => Operation::LaunchVm(from_payload(kind, payload)?),
            OperationKind::DeleteVm => Operation::DeleteVm(from_payload(kind, payload)?),
            OperationKind::StopVm => Operation::StopVm(from_payload(kind, payload)?),
            OperationKind::PauseVm => Operation::PauseVm(from_payload(kind, payload)?),
            OperationKind::ResumeVm => Operation::ResumeVm(from_payload(kind, payload)?),
            OperationKind::SnapshotVm => Operation::SnapshotVm(from_payload(kind, payload)?),
            OperationKind::RunCommand => Operation::RunCommand(from_payload(kind, payload)?),
            OperationKind::UploadFiles => Operation::UploadFiles(from_payload(kind, payload)?),
            OperationKind::DownloadFiles => Operation::DownloadFiles(from_payload(kind, payload)?),
        };
        op.validate()?;
        Ok(op)
    }

    /// Checks every field against the rules in [`validate`].
    pub fn validate(&self) -> Result<(), FieldError> {
        validate::check_vm_name("payload.vmName", self.vm_name())?;
        if let Some(server) = self.requested_server() {
            validate::check_server_name("payload.targetServer", server)?;
        }
        match self {
            Self::LaunchVm(p) => {
                let c = &p.vm_config;
                for (field, value) in [
                    ("payload.vmConfig.kernel", &c.kernel),
                    ("payload.vmConfig.rootfs", &c.rootfs),
                    ("payload.vmConfig.initramfs", &c.initramfs),
                ] {
                    if let Some(v) = value {
                        validate::check_image_path(field, v)?;
                    }
                }
                if let Some(v) = &c.entry_point {
                    validate::check_host_path("payload.vmConfig.entryPoint", v)?;
                }
                if let Some(id) = &c.snapshot_id {
                    validate::check_snapshot_id("payload.vmConfig.snapshotId", id)?;
                }
            }
            Self::SnapshotVm(p) => {
                if let Some(id) = &p.snapshot_id {
                    validate::check_snapshot_id("payload.snapshotId", id)?;
                }
            }
            Self::RunCommand(p) => {
                validate::check_command("payload.command", &p.command)?;
                if let Some(secs) = p.timeout_seconds {
                    validate::check_timeout("payload.timeoutSeconds", secs)?;
                    if !p.blocking {
                        return Err(FieldError::new(
                            "payload.timeoutSeconds",
                            "applies only to blocking commands; a non-blocking command returns at once",
                        ));
                    }
                }
            }
            Self::UploadFiles(p) => validate::check_upload(&p.files)?,
            Self::DownloadFiles(p) => validate::check_download(&p.paths)?,
            Self::DeleteVm(_) | Self::StopVm(_) | Self::PauseVm(_) | Self::ResumeVm(_) => {}
        }
        Ok(())
    }
}

fn from_payload<T: serde::de::DeserializeOwned>(kind: OperationKind, payload: Value) -> Result<T, FieldError> {
    serde_json::from_value(payload).map_err(|e| {
        // serde_json words these well ("missing field `vmName`", "invalid type: integer `3`,
        // expected a string"); add where it applies.
        FieldError::new("payload", format!("invalid {kind} payload: {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<Operation, FieldError> {
        Operation::parse(&v)
    }

    #[test]
    fn parses_the_seed_launch_example_and_keeps_unknown_config_keys() {
        let op = parse(json!({
            "type": "launch_vm",
            "payload": {"vmName": "test-vm-001", "vmConfig": {"memory": "2G"}, "targetServer": "production"}
        }))
        .unwrap();
        let Operation::LaunchVm(launch) = &op else { panic!("{op:?}") };
        assert_eq!(launch.vm_name, "test-vm-001");
        assert_eq!(launch.target_server.as_deref(), Some("production"));
        assert_eq!(launch.vm_config.extra.get("memory"), Some(&json!("2G")));
        // Stored form round-trips, extra keys included.
        let stored = serde_json::to_value(&op).unwrap();
        assert_eq!(stored["payload"]["vmConfig"]["memory"], "2G");
        assert_eq!(serde_json::from_value::<Operation>(stored).unwrap(), op);
    }

    #[test]
    fn accepts_every_operation() {
        let bodies = [
            json!({"type": "launch_vm", "payload": {"vmName": "v"}}),
            json!({"type": "delete_vm", "payload": {"vmName": "v"}}),
            json!({"type": "stop_vm", "payload": {"vmName": "v"}}),
            json!({"type": "pause_vm", "payload": {"vmName": "v"}}),
            json!({"type": "resume_vm", "payload": {"vmName": "v"}}),
            json!({"type": "snapshot_vm", "payload": {"vmName": "v", "snapshotId": "s1"}}),
            json!({"type": "run_command", "payload": {"vmName": "v", "command": "echo hi"}}),
            json!({"type": "upload_files", "payload": {"vmName": "v", "files": [{"path": "a.txt", "content": "hi"}]}}),
            json!({"type": "download_files", "payload": {"vmName": "v", "paths": ["a.txt"]}}),
        ];
        let kinds: Vec<OperationKind> = bodies.into_iter().map(|b| parse(b).unwrap().kind()).collect();
        assert_eq!(kinds, OperationKind::ALL.to_vec());
    }

    #[test]
    fn long_commands_are_those_past_arrakis_limit() {
        let command = |extra: Value| {
            let mut payload = json!({"vmName": "v", "command": "sleep 90"});
            payload.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            let Operation::RunCommand(cmd) = parse(json!({"type": "run_command", "payload": payload})).unwrap() else {
                panic!()
            };
            cmd
        };
        assert_eq!(command(json!({})).timeout(), 30);
        assert!(!command(json!({})).is_long());
        assert!(!command(json!({"timeoutSeconds": 30})).is_long());
        assert!(command(json!({"timeoutSeconds": 31})).is_long());
        assert_eq!(command(json!({"timeoutSeconds": 3600})).timeout(), 3600);
    }

    #[test]
    fn run_command_blocks_by_default() {
        let op = parse(json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls"}})).unwrap();
        let Operation::RunCommand(cmd) = op else { panic!() };
        assert!(cmd.blocking);
    }

    #[test]
    fn errors_name_the_problem() {
        let cases = [
            (json!([]), "body", "JSON object"),
            (json!({"payload": {}}), "type", "is required"),
            (json!({"type": "reboot_vm", "payload": {}}), "type", "unknown operation \"reboot_vm\""),
            (json!({"type": "stop_vm"}), "payload", "is required"),
            (json!({"type": "stop_vm", "payload": "v"}), "payload", "JSON object"),
            (json!({"type": "stop_vm", "payload": {}}), "payload", "missing field `vmName`"),
            (json!({"type": "stop_vm", "payload": {"vmName": 3}}), "payload", "invalid type"),
            (
                json!({"type": "stop_vm", "payload": {"vmName": "v", "vmname": "w"}}),
                "payload",
                "unknown field `vmname`",
            ),
            (json!({"type": "run_command", "payload": {"vmName": "v"}}), "payload", "missing field `command`"),
            (json!({"type": "run_command", "payload": {"vmName": "v", "command": " "}}), "payload.command", "empty"),
            (json!({"type": "stop_vm", "payload": {"vmName": "../etc"}}), "payload.vmName", "'/'"),
            (
                json!({"type": "stop_vm", "payload": {"vmName": "v", "targetServer": "a b"}}),
                "payload.targetServer",
                "' '",
            ),
            (
                json!({"type": "snapshot_vm", "payload": {"vmName": "v", "snapshotId": ".."}}),
                "payload.snapshotId",
                "must not start",
            ),
            (json!({"type": "stop_vm", "payload": {"vmName": "v"}, "extra": 1}), "extra", "unknown top-level"),
            (
                json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "timeoutSeconds": 0}}),
                "payload.timeoutSeconds",
                "from 1 to 3600",
            ),
            (
                json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "timeoutSeconds": 3601}}),
                "payload.timeoutSeconds",
                "from 1 to 3600",
            ),
            (
                json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "timeoutSeconds": -1}}),
                "payload",
                "invalid value",
            ),
            (
                json!({"type": "run_command", "payload": {"vmName": "v", "command": "ls", "blocking": false, "timeoutSeconds": 60}}),
                "payload.timeoutSeconds",
                "only to blocking",
            ),
            (json!({"type": "upload_files", "payload": {"vmName": "v", "files": []}}), "payload.files", "at least one"),
            (json!({"type": "upload_files", "payload": {"vmName": "v"}}), "payload", "missing field `files`"),
            (
                json!({"type": "upload_files", "payload": {"vmName": "v", "files": [{"path": "", "content": ""}]}}),
                "payload.files[0].path",
                "must not be empty",
            ),
            (
                json!({"type": "upload_files", "payload": {"vmName": "v", "files": [{"path": "a", "content": 3}]}}),
                "payload",
                "invalid type",
            ),
            (
                json!({"type": "upload_files", "payload": {"vmName": "v", "files": [{"path": "a", "content": "x".repeat(48 * 1024 + 1)}]}}),
                "payload.files",
                "at most 49152 bytes",
            ),
            (
                json!({"type": "upload_files", "payload": {"vmName": "v", "files": [{"path": "d/", "content": ""}]}}),
                "payload.files[0].path",
                "directory",
            ),
            (
                json!({"type": "download_files", "payload": {"vmName": "v", "paths": []}}),
                "payload.paths",
                "at least one",
            ),
            (
                json!({"type": "download_files", "payload": {"vmName": "v", "paths": ["a,b"]}}),
                "payload.paths[0]",
                "','",
            ),
            (
                json!({"type": "download_files", "payload": {"vmName": "v", "paths": ["ok", "../etc/passwd"]}}),
                "payload.paths[1]",
                "'..'",
            ),
            (
                json!({"type": "download_files", "payload": {"vmName": "v", "paths": vec!["a"; 65]}}),
                "payload.paths",
                "at most 64",
            ),
        ];
        for (body, field, needle) in cases {
            let err = parse(body.clone()).unwrap_err();
            assert_eq!(err.field, field, "{body}");
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }
}
