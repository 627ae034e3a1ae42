//! Which host files a client may boot a VM from.
//!
//! A task's `vmConfig.kernel`, `rootfs` and `initramfs` are host paths handed to Arrakis, which
//! would attach `/dev/sda` to a guest if asked. Only files under the directories of
//! `ALLOWED_IMAGE_DIRS` are accepted: the path must be absolute, without `..`, lexically under
//! an allowed directory, and, where it exists, still under one once symlinks are resolved, and
//! a regular file. Anything else is refused before Arrakis sees the request.

use std::path::{Path, PathBuf};

/// The directories images may come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePolicy {
    allowed: Vec<PathBuf>,
}

impl ImagePolicy {
    /// A policy allowing files under `dirs` (absolute paths).
    pub fn new(dirs: impl IntoIterator<Item = PathBuf>) -> Self {
        Self { allowed: dirs.into_iter().collect() }
    }

    /// The directories of `files`, each once: the default when `ALLOWED_IMAGE_DIRS` is unset.
    pub fn directories_of<'a>(files: impl IntoIterator<Item = &'a str>) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for file in files {
            if let Some(dir) = Path::new(file).parent().filter(|d| d.is_absolute()) {
                if !dirs.iter().any(|d| d == dir) {
                    dirs.push(dir.to_owned());
                }
            }
        }
        dirs
    }

    pub fn allowed(&self) -> &[PathBuf] {
        &self.allowed
    }

    /// `Ok` when `path` may be booted from; else why not, naming `field`.
    pub fn check(&self, field: &str, path: &str) -> Result<(), String> {
        let refuse = |why: &str| {
            let dirs: Vec<String> = self.allowed.iter().map(|d| d.display().to_string()).collect();
            Err(format!("vmConfig.{field} {path:?} {why}; images must be files under {}", dirs.join(", ")))
        };
        let p = Path::new(path);
        if !p.is_absolute() {
            return refuse("is not an absolute path");
        }
        if path.contains('\0') || path.split('/').any(|segment| segment == "." || segment == "..") {
            return refuse("contains `..`, `.` or NUL");
        }
        if !self.allowed.iter().any(|dir| p.starts_with(dir)) {
            return refuse("is outside the allowed image directories");
        }
        // Symlinks (the file's or a directory's on the way) must not lead out.
        let resolved = resolve_existing(p);
        let inside = self.allowed.iter().any(|dir| {
            let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.clone());
            resolved.starts_with(dir)
        });
        if !inside {
            return refuse(&format!("resolves to {} outside the allowed image directories", resolved.display()));
        }
        if std::fs::metadata(p).is_ok_and(|m| !m.is_file()) {
            return refuse("is not a regular file");
        }
        Ok(())
    }
}

/// `path` with its longest existing prefix canonicalized (symlinks followed) and the rest,
/// which does not exist yet, appended as written.
fn resolve_existing(path: &Path) -> PathBuf {
    for existing in path.ancestors() {
        if let Ok(resolved) = std::fs::canonicalize(existing) {
            let rest = path.strip_prefix(existing).unwrap_or(Path::new(""));
            return if rest.as_os_str().is_empty() { resolved } else { resolved.join(rest) };
        }
    }
    path.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("lc-images-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("images")).unwrap();
        dir
    }

    #[test]
    fn the_default_covers_the_default_images() {
        let dirs = ImagePolicy::directories_of([
            "/opt/arrakis/vmlinux.bin",
            "/opt/arrakis/rootfs.ext4",
            "/srv/boot/initramfs.cpio.gz",
        ]);
        assert_eq!(dirs, [PathBuf::from("/opt/arrakis"), PathBuf::from("/srv/boot")]);
        let policy = ImagePolicy::new(dirs);
        policy.check("kernel", "/opt/arrakis/vmlinux.bin").unwrap();
        policy.check("rootfs", "/opt/arrakis/custom/rootfs.ext4").unwrap();
    }

    #[test]
    fn issue_11_host_devices_and_escapes_are_refused() {
        let policy = ImagePolicy::new([PathBuf::from("/opt/arrakis")]);
        for (path, why) in [
            ("/dev/sda", "outside"),
            ("/etc/shadow", "outside"),
            ("/opt/arrakis/../../etc/shadow", "`..`"),
            ("/opt/arrakis/./rootfs.ext4", "`.`"),
            ("rootfs.ext4", "absolute"),
            ("/opt/arrakis-evil/rootfs.ext4", "outside"),
            ("/opt/arrakis/a\0b", "NUL"),
        ] {
            let e = policy.check("rootfs", path).unwrap_err();
            assert!(e.contains(why), "{path:?}: {e}");
            assert!(e.contains("vmConfig.rootfs") && e.contains("/opt/arrakis"), "{e}");
        }
    }

    #[test]
    fn symlinks_out_of_the_directory_are_refused() {
        let dir = scratch("links");
        let images = dir.join("images");
        std::fs::write(images.join("rootfs.ext4"), b"fs").unwrap();
        std::fs::write(dir.join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(dir.join("secret"), images.join("link")).unwrap();
        std::os::unix::fs::symlink(&dir, images.join("up")).unwrap();
        std::os::unix::fs::symlink(images.join("rootfs.ext4"), images.join("inner")).unwrap();
        std::fs::create_dir(images.join("sub")).unwrap();
        let policy = ImagePolicy::new([images.clone()]);
        let at = |name: &str| images.join(name).display().to_string();

        policy.check("rootfs", &at("rootfs.ext4")).unwrap();
        policy.check("rootfs", &at("inner")).unwrap();
        policy.check("rootfs", &at("not-yet-there.ext4")).unwrap();
        assert!(policy.check("rootfs", &at("link")).unwrap_err().contains("resolves to"));
        assert!(policy.check("rootfs", &at("up/secret")).unwrap_err().contains("resolves to"));
        assert!(policy.check("rootfs", &at("up/missing")).unwrap_err().contains("resolves to"));
        assert!(policy.check("rootfs", &at("sub")).unwrap_err().contains("not a regular file"));
        let _ = std::fs::remove_dir_all(dir);
    }
}
