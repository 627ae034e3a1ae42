//! The whole system on one machine: the runner behind `cargo xtask dev` and the harness of the
//! end-to-end tests (`tests/e2e`) and the benchmarks (`crates/bench`).
//!
//! A [`Stack`] runs one `wrangler dev` session holding the dev gateway and both workers (so
//! they share KV and the queue, as deployed workers do), the Arrakis simulator, and the
//! `local-consumer` daemon, each as a child process with its log in the stack's directory.
//! [`ApiClient`] talks to the workers through the gateway with typed wire bodies.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use stack::{Stack, StackOptions};
//! // The workers alone; the test plays the daemon through the consumer API.
//! let stack = Stack::start(StackOptions::edge_only().worker_var("BELL_CHECK_MS", 100)).await?;
//! let api = stack.client();
//! let body = serde_json::json!({"vmName": "vm-1", "targetServer": "production"});
//! let created = api.submit_op("launch_vm", body).await?;
//! let claimed = api.claim(created.task_id, "test", Some(60)).await?;
//! # let _ = claimed;
//! # Ok(())
//! # }
//! ```
//!
//! The workers must be built (`cargo xtask build-worker api-worker` and `consumer-worker`)
//! and, for stacks with a simulator or daemon, the native binaries too (`cargo xtask build`).

pub mod client;
pub mod options;
mod process;
mod stack;
mod wrangler;

use std::path::{Path, PathBuf};

use anyhow::Context;

pub use client::{ApiClient, Auth, ClientError, ClientResult};
pub use options::{Profile, StackOptions};
pub use reqwest::{Method, StatusCode};
pub use stack::{random_token, random_webhook_secret, Stack};

/// The workspace root, found from this crate's location (`crates/stack`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).ancestors().nth(2).expect("crates/stack lives two levels down").to_path_buf()
}

/// Writes `text` to a file only its owner can read, for files holding bearer tokens.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::{
        io::Write,
        os::unix::fs::{OpenOptionsExt, PermissionsExt},
    };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("could not write {}", path.display()))?;
    // `mode` applies only to a new file; an older one may have been created more open.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("could not restrict {}", path.display()))?;
    file.write_all(text.as_bytes()).with_context(|| format!("could not write {}", path.display()))
}
