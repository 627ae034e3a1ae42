//! Footprint: the workers' wasm sizes, raw and `gzip -9`, the daemon binary, and the daemon's
//! memory as the throughput run measured it.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use stack::StackOptions;

use crate::{
    report::{kib, mark, mib, table},
    throughput::Memory,
};

/// The repository's own wasm budget (workspace `Cargo.toml`: "the 1 MB gzip target").
const TARGET_WASM_GZIP_BYTES: u64 = 1_000_000;

pub(crate) fn render_footprint(root: &Path, memory: Option<Memory>, targets: &mut Vec<(String, bool)>) -> String {
    let mut rows = Vec::new();
    for worker in ["api-worker", "consumer-worker"] {
        let path = root.join(worker).join("build/index_bg.wasm");
        match wasm_sizes(&path) {
            Ok((raw, gz)) => {
                let ok = gz < TARGET_WASM_GZIP_BYTES;
                targets.push((format!("{worker} wasm gzip -9 {} (repo target < 1 MB)", kib(gz)), ok));
                rows.push(vec![
                    format!("{worker}/build/index_bg.wasm"),
                    kib(raw),
                    format!("{} ({gz} bytes)", kib(gz)),
                    format!("< 1 MB: {}", mark(ok)),
                ]);
            }
            Err(e) => {
                rows.push(vec![format!("{worker}/build/index_bg.wasm"), format!("{e:#}"), String::new(), String::new()])
            }
        }
    }
    let daemon_bin = StackOptions::default().resolved_bin_dir(root).join("local-consumer");
    if let Ok(meta) = std::fs::metadata(&daemon_bin) {
        rows.push(vec!["daemon binary (release)".into(), kib(meta.len()), String::new(), String::new()]);
    }
    let memory_text = match memory {
        Some(m) => table(
            &["daemon memory (the last throughput run's stack)", "kB", "MiB"],
            &[
                vec![
                    "VmRSS idle, before the throughput run".into(),
                    m.idle_before_kb.to_string(),
                    mib(m.idle_before_kb),
                ],
                vec!["VmRSS idle, after the throughput run".into(), m.rss_after_kb.to_string(), mib(m.rss_after_kb)],
                vec!["VmHWM (peak RSS) after the throughput run".into(), m.hwm_kb.to_string(), mib(m.hwm_kb)],
            ],
        ),
        None => "Daemon memory: run the `throughput` section to measure it.\n".into(),
    };
    format!("## Footprint\n\n{}\n{memory_text}", table(&["artifact", "raw", "gzip -9", "target"], &rows))
}

fn wasm_sizes(path: &Path) -> Result<(u64, u64)> {
    let raw = std::fs::metadata(path).with_context(|| format!("{} is missing", path.display()))?.len();
    let out = std::process::Command::new("gzip").args(["-9", "-c"]).arg(path).output().context("could not run gzip")?;
    ensure!(out.status.success(), "gzip -9 failed on {}", path.display());
    Ok((raw, out.stdout.len() as u64))
}
