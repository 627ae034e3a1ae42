//! Input rules shared by the API (which rejects bad input with a 4xx) and the daemon (which
//! re-checks before building an Arrakis URL).
//!
//! VM names, snapshot ids and server names become Arrakis URL path segments, directories on
//! the host and parts of KV keys, so one conservative rule covers all three.

use std::fmt;

/// Size limits on user input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits;

impl Limits {
    /// Longest VM or server name.
    pub const NAME_MAX: usize = 63;
    /// Longest snapshot id; longer than a name so `<vmName>-<suffix>` always fits.
    pub const SNAPSHOT_ID_MAX: usize = 128;
    /// Largest `run_command` command, in bytes.
    pub const COMMAND_MAX_BYTES: usize = 16 * 1024;
    /// Largest request body the API reads, in bytes.
    pub const BODY_MAX_BYTES: usize = 64 * 1024;
    /// Longest host path in `vmConfig` (kernel, rootfs, initramfs).
    pub const PATH_MAX: usize = 4096;
    /// Longest `Idempotency-Key` header.
    pub const IDEMPOTENCY_KEY_MAX: usize = 255;
    /// Longest wait a client may ask for on `GET /vm/tasks/:id?wait=N`, in seconds.
    pub const WAIT_MAX_SECS: u64 = 60;
    /// Largest page of `GET /vm/tasks`.
    pub const LIST_LIMIT_MAX: usize = 1000;
    /// Most servers one `/tasks/ready` poll may name: a daemon serves at most this many
    /// (`SERVER_NAMES`), and validates it at startup as the edge does here.
    pub const SERVERS_PER_POLL_MAX: usize = 32;
    /// Page size of `GET /vm/tasks` when `limit` is absent.
    pub const LIST_LIMIT_DEFAULT: usize = 50;
    /// Longest `run_command` `timeoutSeconds`.
    pub const COMMAND_TIMEOUT_MAX_SECS: u64 = 3600;
    /// Most files in one `upload_files` or paths in one `download_files`.
    pub const FILES_MAX: usize = 64;
    /// Longest file path in `upload_files` / `download_files`, in bytes.
    pub const FILE_PATH_MAX: usize = 1024;
    /// Total `content` bytes of one `upload_files`. The request body (64 KiB) must also hold
    /// the JSON around it, so content that needs many escapes meets the 413 first.
    pub const UPLOAD_MAX_BYTES: usize = 48 * 1024;
    /// Total content bytes one `download_files` may bring back: its result travels in the
    /// daemon's report, which the API caps at 64 KiB of JSON. A download over it ends
    /// `failed` saying so (never truncated: a copy must arrive whole or not at all).
    pub const DOWNLOAD_MAX_BYTES: usize = 48 * 1024;
}

/// A problem with one field of a request, named by its JSON path (`payload.vmName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for FieldError {}

/// Checks a name used as one URL path segment, directory and key part: 1 to `max` characters
/// of `[A-Za-z0-9._-]`, not starting with `.` or `-` (which rules out `.`, `..` and
/// option-like names).
pub fn check_segment(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(FieldError::new(field, format!("must be at most {max} characters, got {}", value.chars().count())));
    }
    if let Some(bad) = value.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(FieldError::new(
            field,
            format!("contains {bad:?}; only letters, digits, '.', '_' and '-' are allowed"),
        ));
    }
    if value.starts_with(['.', '-']) {
        return Err(FieldError::new(field, "must not start with '.' or '-'"));
    }
    Ok(())
}

pub fn check_vm_name(field: &str, value: &str) -> Result<(), FieldError> {
    check_segment(field, value, Limits::NAME_MAX)
}

pub fn check_server_name(field: &str, value: &str) -> Result<(), FieldError> {
    check_segment(field, value, Limits::NAME_MAX)
}

pub fn check_snapshot_id(field: &str, value: &str) -> Result<(), FieldError> {
    check_segment(field, value, Limits::SNAPSHOT_ID_MAX)
}

pub fn check_command(field: &str, value: &str) -> Result<(), FieldError> {
    if value.trim().is_empty() {
        return Err(FieldError::new(field, "must not be empty or only whitespace"));
    }
    if value.len() > Limits::COMMAND_MAX_BYTES {
        return Err(FieldError::new(
            field,
            format!("must be at most {} bytes, got {}", Limits::COMMAND_MAX_BYTES, value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// `run_command`'s `timeoutSeconds`: 1 to [`Limits::COMMAND_TIMEOUT_MAX_SECS`].
pub fn check_timeout(field: &str, secs: u64) -> Result<(), FieldError> {
    if !(1..=Limits::COMMAND_TIMEOUT_MAX_SECS).contains(&secs) {
        return Err(FieldError::new(
            field,
            format!("must be from 1 to {} seconds, got {secs}", Limits::COMMAND_TIMEOUT_MAX_SECS),
        ));
    }
    Ok(())
}

/// A guest file path: non-empty (Arrakis would skip it silently), bounded, NUL-free, naming
/// a file rather than a directory.
fn check_file_path(field: &str, path: &str) -> Result<(), FieldError> {
    if path.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if path.len() > Limits::FILE_PATH_MAX {
        return Err(FieldError::new(field, format!("must be at most {} bytes", Limits::FILE_PATH_MAX)));
    }
    if path.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    if path.ends_with('/') {
        return Err(FieldError::new(field, format!("names a directory ({path:?}); give a file path")));
    }
    Ok(())
}

fn check_file_count(field: &str, count: usize) -> Result<(), FieldError> {
    if count == 0 {
        return Err(FieldError::new(field, "must name at least one file"));
    }
    if count > Limits::FILES_MAX {
        return Err(FieldError::new(field, format!("must name at most {} files, got {count}", Limits::FILES_MAX)));
    }
    Ok(())
}

/// `upload_files`: 1 to [`Limits::FILES_MAX`] files with valid paths, and at most
/// [`Limits::UPLOAD_MAX_BYTES`] of content in all.
pub fn check_upload(files: &[crate::operation::FileContent]) -> Result<(), FieldError> {
    check_file_count("payload.files", files.len())?;
    for (i, file) in files.iter().enumerate() {
        check_file_path(&format!("payload.files[{i}].path"), &file.path)?;
    }
    let total: usize = files.iter().map(|f| f.content.len()).sum();
    if total > Limits::UPLOAD_MAX_BYTES {
        return Err(FieldError::new(
            "payload.files",
            format!("content must total at most {} bytes, got {total}", Limits::UPLOAD_MAX_BYTES),
        ));
    }
    Ok(())
}

/// `download_files`: 1 to [`Limits::FILES_MAX`] paths of `[A-Za-z0-9._/-]` without a `..`
/// segment. Arrakis pastes the list unescaped into the guest's URL, joined by commas, and
/// resolves every path under `/tmp/server_files` (BEHAVIOR §2.11): other characters would
/// break the request, and `..` would leave that directory.
pub fn check_download(paths: &[String]) -> Result<(), FieldError> {
    check_file_count("payload.paths", paths.len())?;
    for (i, path) in paths.iter().enumerate() {
        let field = format!("payload.paths[{i}]");
        check_file_path(&field, path)?;
        if let Some(bad) = path.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))) {
            return Err(FieldError::new(
                field,
                format!("contains {bad:?}; download paths may use only letters, digits, '.', '_', '-' and '/'"),
            ));
        }
        if path.split('/').any(|segment| segment == "..") {
            return Err(FieldError::new(
                field,
                "must not contain a '..' segment; downloads read under /tmp/server_files",
            ));
        }
    }
    Ok(())
}

/// Host paths in `vmConfig`: optional, but when present non-empty, bounded and NUL-free.
pub fn check_host_path(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty when present"));
    }
    if value.len() > Limits::PATH_MAX {
        return Err(FieldError::new(field, format!("must be at most {} bytes", Limits::PATH_MAX)));
    }
    if value.contains('\0') {
        return Err(FieldError::new(field, "must not contain NUL bytes"));
    }
    Ok(())
}

/// Image paths in `vmConfig` (`kernel`, `rootfs`, `initramfs`): a host path, and one that
/// cannot point anywhere by itself: absolute, with no `..` segment. The daemon still allows
/// only its configured image directories; this refuses early what is never right.
pub fn check_image_path(field: &str, value: &str) -> Result<(), FieldError> {
    check_host_path(field, value)?;
    if !value.starts_with('/') {
        return Err(FieldError::new(field, format!("must be an absolute path, got {value:?}")));
    }
    if value.split('/').any(|segment| segment == "..") {
        return Err(FieldError::new(field, "must not contain a '..' segment"));
    }
    Ok(())
}

/// Task ids are UUIDs in their canonical hyphenated form.
pub fn parse_task_id(field: &str, value: &str) -> Result<uuid::Uuid, FieldError> {
    uuid::Uuid::try_parse(value)
        .ok()
        .filter(|_| value.len() == 36)
        .ok_or_else(|| FieldError::new(field, format!("{value:?} is not a UUID")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["test-vm-001", "a", "vm_1.prod", "A9", &"x".repeat(63)] {
            check_vm_name("vmName", ok).unwrap();
        }
    }

    #[test]
    fn rejects_names_that_are_not_one_safe_segment() {
        let cases: [(&str, &str); 9] = [
            ("", "must not be empty"),
            ("a/b", "'/'"),
            ("..", "must not start"),
            (".hidden", "must not start"),
            ("-rf", "must not start"),
            ("has space", "' '"),
            ("naïve", "'ï'"),
            ("a%2Fb", "'%'"),
            ("semi;colon", "';'"),
        ];
        for (bad, expected) in cases {
            let err = check_vm_name("payload.vmName", bad).unwrap_err();
            assert_eq!(err.field, "payload.vmName");
            assert!(err.message.contains(expected), "{bad:?}: {}", err.message);
        }
        let long = "x".repeat(64);
        assert!(check_vm_name("vmName", &long).unwrap_err().message.contains("at most 63"));
    }

    #[test]
    fn commands_must_be_non_blank_and_bounded() {
        check_command("c", "echo hi").unwrap();
        assert!(check_command("c", "  \n").is_err());
        assert!(check_command("c", &"x".repeat(Limits::COMMAND_MAX_BYTES + 1))
            .unwrap_err()
            .message
            .contains("at most 16384 bytes"));
        check_command("c", &"x".repeat(Limits::COMMAND_MAX_BYTES)).unwrap();
    }

    #[test]
    fn image_paths_must_be_absolute_without_parent_segments() {
        check_image_path("kernel", "/var/lib/arrakis/images/vmlinux").unwrap();
        check_image_path("kernel", "/images/a..b/vmlinux").unwrap();
        let message = |v: &str| check_image_path("payload.vmConfig.kernel", v).unwrap_err().message;
        assert!(message("images/vmlinux").contains("absolute"));
        assert!(message("/images/../../etc/shadow").contains("'..'"));
        assert!(message("/images/..").contains("'..'"));
        assert!(message("/images/vm\0linux").contains("NUL"));
    }

    #[test]
    fn task_ids_must_be_canonical_uuids() {
        parse_task_id("id", "0190b5a4-3b7c-7def-8abc-0123456789ab").unwrap();
        for bad in ["", "123", "0190b5a43b7c7def8abc0123456789ab", "not-a-uuid-at-all-not-a-uuid-at-all"] {
            assert!(parse_task_id("id", bad).is_err(), "{bad}");
        }
    }
}
