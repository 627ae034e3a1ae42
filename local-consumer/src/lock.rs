//! One daemon per server name per host: each served name holds an exclusive lock file for
//! the daemon's lifetime, so a second daemon for the same name refuses to start.

use std::{fs::File, path::Path};

use anyhow::{bail, Context, Result};

/// Held locks; released when dropped (or when the process dies, even by SIGKILL).
#[derive(Debug)]
pub struct ServerLocks(#[allow(dead_code)] Vec<File>);

pub fn lock_servers(dir: &Path, servers: &[String]) -> Result<ServerLocks> {
    std::fs::create_dir_all(dir).with_context(|| format!("LOCK_DIR: cannot create {}", dir.display()))?;
    let mut files = Vec::new();
    for server in servers {
        let path = dir.join(format!("{server}.lock"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("LOCK_DIR: cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => files.push(file),
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another local-consumer already serves server {server:?} on this host (it holds {}); \
                 run one daemon per server name",
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()))
            }
        }
    }
    Ok(ServerLocks(files))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_daemon_for_the_same_server_is_refused() {
        let dir = std::env::temp_dir().join(format!("lc-lock-{}", std::process::id()));
        let first = lock_servers(&dir, &["production".into()]).unwrap();
        let err = lock_servers(&dir, &["staging".into(), "production".into()]).unwrap_err();
        assert!(err.to_string().contains("already serves server \"production\""), "{err}");
        lock_servers(&dir, &["staging".into()]).unwrap();
        drop(first);
        lock_servers(&dir, &["production".into()]).unwrap();
    }
}
