//! A tiny in-memory guest filesystem: one per simulated VM, read and written by the command
//! interpreter and by the files endpoints.
//!
//! Paths are absolute and normalised (no `.`, `..` or repeated slashes) before they reach the
//! map, so one string compare answers "is this the same file". Error texts follow Linux errno
//! wording, because the guest tools (Go's `os`, coreutils) print them.

use std::collections::BTreeMap;

/// The guest agent's working directory and the base of relative upload and download paths.
pub const SERVER_FILES: &str = "/tmp/server_files";

/// Directories every fresh guest has; enough for `ls /`, `mkdir -p /opt/x` and `/tmp` uploads.
const INITIAL_DIRS: &[&str] =
    &["/", "/bin", "/etc", "/home", "/opt", "/root", "/tmp", SERVER_FILES, "/usr", "/usr/bin", "/var"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(String),
}

/// Why a filesystem call failed, as errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsError {
    NotFound,
    NotADirectory,
    IsADirectory,
    Exists,
    NotEmpty,
}

impl FsError {
    /// The C library's wording, as Go and coreutils print it (Go lowercases the first letter).
    pub fn text(self) -> &'static str {
        match self {
            FsError::NotFound => "No such file or directory",
            FsError::NotADirectory => "Not a directory",
            FsError::IsADirectory => "Is a directory",
            FsError::Exists => "File exists",
            FsError::NotEmpty => "Directory not empty",
        }
    }

    /// Go's `syscall.Errno` strings are lowercase.
    pub fn go_text(self) -> String {
        let text = self.text();
        let mut chars = text.chars();
        match chars.next() {
            Some(first) => first.to_lowercase().chain(chars).collect(),
            None => String::new(),
        }
    }
}

/// The guest's files and directories, keyed by normalised absolute path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFs {
    nodes: BTreeMap<String, Node>,
}

impl GuestFs {
    /// A fresh guest with the standard directories and `/etc/hostname`.
    pub fn new(hostname: &str) -> Self {
        let mut nodes: BTreeMap<String, Node> = INITIAL_DIRS.iter().map(|d| (d.to_string(), Node::Dir)).collect();
        nodes.insert("/etc/hostname".into(), Node::File(format!("{hostname}\n")));
        Self { nodes }
    }

    /// What a cold boot does: Ubuntu empties `/tmp`, and the agent recreates its directory.
    pub fn clear_tmp(&mut self) {
        self.nodes.retain(|path, _| !path.starts_with("/tmp/"));
        self.nodes.insert(SERVER_FILES.into(), Node::Dir);
    }

    pub fn is_dir(&self, path: &str) -> bool {
        matches!(self.nodes.get(path), Some(Node::Dir))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.nodes.contains_key(path)
    }

    /// Checks that every ancestor of `path` is a directory, as a path lookup would.
    fn check_parents(&self, path: &str) -> Result<(), FsError> {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in parts.iter().take(parts.len().saturating_sub(1)) {
            prefix.push('/');
            prefix.push_str(part);
            match self.nodes.get(&prefix) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(FsError::NotADirectory),
                None => return Err(FsError::NotFound),
            }
        }
        Ok(())
    }

    pub fn read(&self, path: &str) -> Result<&str, FsError> {
        self.check_parents(path)?;
        match self.nodes.get(path) {
            Some(Node::File(content)) => Ok(content),
            Some(Node::Dir) => Err(FsError::IsADirectory),
            None => Err(FsError::NotFound),
        }
    }

    /// Creates or truncates (or, with `append`, extends) a file; the parent must exist.
    pub fn write(&mut self, path: &str, content: &str, append: bool) -> Result<(), FsError> {
        self.check_parents(path)?;
        match self.nodes.get_mut(path) {
            Some(Node::Dir) => Err(FsError::IsADirectory),
            Some(Node::File(existing)) if append => {
                existing.push_str(content);
                Ok(())
            }
            _ => {
                self.nodes.insert(path.to_string(), Node::File(content.to_string()));
                Ok(())
            }
        }
    }

    /// `mkdir` without `-p`: the parent must exist and the path must not.
    pub fn mkdir(&mut self, path: &str) -> Result<(), FsError> {
        self.check_parents(path)?;
        if self.nodes.contains_key(path) {
            return Err(FsError::Exists);
        }
        self.nodes.insert(path.to_string(), Node::Dir);
        Ok(())
    }

    /// `mkdir -p`: creates missing ancestors; fails only when a component is a file.
    pub fn mkdir_all(&mut self, path: &str) -> Result<(), FsError> {
        let mut prefix = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            prefix.push('/');
            prefix.push_str(part);
            match self.nodes.get(&prefix) {
                Some(Node::Dir) => {}
                Some(Node::File(_)) => return Err(FsError::Exists),
                None => {
                    self.nodes.insert(prefix.clone(), Node::Dir);
                }
            }
        }
        Ok(())
    }

    /// Names directly inside a directory, sorted bytewise (as `ls` does under `LC_ALL=C`).
    pub fn list(&self, path: &str) -> Result<Vec<String>, FsError> {
        self.check_parents(path)?;
        match self.nodes.get(path) {
            Some(Node::Dir) => {}
            Some(Node::File(_)) => return Err(FsError::NotADirectory),
            None => return Err(FsError::NotFound),
        }
        let prefix = if path == "/" { "/".to_string() } else { format!("{path}/") };
        Ok(self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .filter_map(|(p, _)| {
                let rest = &p[prefix.len()..];
                (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
            })
            .collect())
    }

    /// Removes a file, or with `recursive` a directory and everything under it.
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<(), FsError> {
        self.check_parents(path)?;
        match self.nodes.get(path) {
            None => Err(FsError::NotFound),
            Some(Node::File(_)) => {
                self.nodes.remove(path);
                Ok(())
            }
            Some(Node::Dir) if !recursive => Err(FsError::IsADirectory),
            Some(Node::Dir) => {
                let prefix = format!("{path}/");
                self.nodes.retain(|p, _| p != path && !p.starts_with(&prefix));
                // Removing `/` would leave no root; real `rm` refuses it as well.
                self.nodes.entry("/".into()).or_insert(Node::Dir);
                Ok(())
            }
        }
    }

    /// Every file path, for the simulator's state dump.
    pub fn file_paths(&self) -> Vec<String> {
        self.nodes.iter().filter(|(_, n)| matches!(n, Node::File(_))).map(|(p, _)| p.clone()).collect()
    }
}

/// Resolves `path` against `cwd` and normalises it like Go's `filepath.Clean` on an absolute
/// path: `..` above the root stays at the root.
pub fn resolve(cwd: &str, path: &str) -> String {
    let joined = if path.starts_with('/') { path.to_string() } else { format!("{cwd}/{path}") };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_normalises_like_go_clean() {
        assert_eq!(resolve(SERVER_FILES, "a.txt"), "/tmp/server_files/a.txt");
        assert_eq!(resolve(SERVER_FILES, "../x"), "/tmp/x");
        assert_eq!(resolve(SERVER_FILES, "/etc//hosts"), "/etc/hosts");
        assert_eq!(resolve("/", "../../.."), "/");
        assert_eq!(resolve(SERVER_FILES, ""), SERVER_FILES);
    }

    #[test]
    fn writes_need_an_existing_parent() {
        let mut fs = GuestFs::new("vm");
        assert_eq!(fs.write("/tmp/server_files/d/f", "x", false), Err(FsError::NotFound));
        fs.mkdir_all("/tmp/server_files/d").unwrap();
        fs.write("/tmp/server_files/d/f", "x", false).unwrap();
        fs.write("/tmp/server_files/d/f", "y", true).unwrap();
        assert_eq!(fs.read("/tmp/server_files/d/f"), Ok("xy"));
        assert_eq!(fs.read("/tmp/server_files/d/f/g"), Err(FsError::NotADirectory));
        assert_eq!(fs.read("/tmp/server_files/d"), Err(FsError::IsADirectory));
        assert_eq!(fs.list("/tmp/server_files").unwrap(), vec!["d"]);
    }

    #[test]
    fn clear_tmp_keeps_the_rest() {
        let mut fs = GuestFs::new("vm");
        fs.write("/tmp/server_files/a", "1", false).unwrap();
        fs.write("/root/b", "2", false).unwrap();
        fs.clear_tmp();
        assert!(!fs.exists("/tmp/server_files/a"));
        assert!(fs.is_dir(SERVER_FILES));
        assert_eq!(fs.read("/root/b"), Ok("2"));
    }
}
