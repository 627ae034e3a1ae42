//! The per-stack copies of the three wrangler configs and the `.dev.vars` file beside them.
//!
//! The copies differ from the real files only in `main` (made absolute, pointing at the
//! prebuilt bundles) and in lacking `[build]` (no rebuilding and no watching under test); KV
//! bindings, queues and crons stay as written, so the stack runs what gets deployed. Plain
//! text substitution keeps comments and layout and needs no TOML crate.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use anyhow::{ensure, Context, Result};

/// The three configs in the order `wrangler dev -c ... -c ... -c ...` takes them: only the
/// first is served on the port, so the gateway goes first.
pub(crate) struct Configs {
    pub gateway: PathBuf,
    pub api: PathBuf,
    pub consumer: PathBuf,
}

/// Writes the configs and `.dev.vars` into `dir`. `vars` are written after the tokens, so
/// an override of `API_TOKENS` or `CONSUMER_TOKENS` wins.
pub(crate) fn write_configs(root: &Path, dir: &Path, vars: &[(String, String)]) -> Result<Configs> {
    let sources = [
        ("wrangler-gateway.toml", root.join("dev/gateway/wrangler.toml"), root.join("dev/gateway/index.js")),
        ("wrangler-api.toml", root.join("wrangler-api.toml"), root.join("api-worker/build/worker/shim.mjs")),
        (
            "wrangler-consumer.toml",
            root.join("wrangler-consumer.toml"),
            root.join("consumer-worker/build/worker/shim.mjs"),
        ),
    ];
    let mut written = Vec::with_capacity(3);
    for (name, source, main) in sources {
        ensure!(
            main.exists(),
            "{} is missing; build the workers first: cargo xtask build-worker api-worker && cargo xtask build-worker consumer-worker",
            main.display()
        );
        // Each stack runs its own copy of the bundles: a rebuild in the repo (or a wrangler
        // watcher elsewhere) must not reload a running test stack under its feet.
        let main = snapshot_bundle(root, dir, &main)?;
        let text = std::fs::read_to_string(&source).with_context(|| format!("could not read {}", source.display()))?;
        let out = dir.join(name);
        std::fs::write(&out, rewrite_config(&text, &main)?)
            .with_context(|| format!("could not write {}", out.display()))?;
        written.push(out);
    }
    let dev_vars = dir.join(".dev.vars");
    // Owner-only: it holds the bearer tokens.
    crate::write_private(&dev_vars, &dev_vars_text(vars)?)?;
    let [gateway, api, consumer]: [PathBuf; 3] = written.try_into().expect("three configs");
    Ok(Configs { gateway, api, consumer })
}

/// Copies the directory that holds a worker's bundle (`<crate>/build`, or the gateway's
/// directory) under `dir/bundles`, and returns the copied entry point.
fn snapshot_bundle(root: &Path, dir: &Path, main: &Path) -> Result<PathBuf> {
    let relative = main.strip_prefix(root).with_context(|| format!("{} is outside the repo", main.display()))?;
    // api-worker/build/worker/shim.mjs -> copy api-worker/build; dev/gateway/index.js -> dev/gateway.
    let top: PathBuf = match relative.components().nth(1).map(|c| c.as_os_str()) {
        Some(c) if c == "build" => relative.components().take(2).collect(),
        _ => relative.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    copy_dir(&root.join(&top), &dir.join("bundles").join(&top))?;
    Ok(dir.join("bundles").join(relative))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("could not create {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("could not read {}", from.display()))? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            if entry.file_name() != ".wrangler" {
                copy_dir(&entry.path(), &target)?;
            }
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("could not copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `text` with its top-level `main` pointing at `main` and its `[build]` table removed.
pub(crate) fn rewrite_config(text: &str, main: &Path) -> Result<String> {
    let mut out = String::with_capacity(text.len());
    let mut in_build = false;
    let mut in_top_level = true;
    let mut replaced = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with('[') {
            in_top_level = false;
            in_build = trimmed.starts_with("[build]");
        }
        if in_build {
            continue;
        }
        if in_top_level && key_of(trimmed) == Some("main") {
            writeln!(out, "main = {}", toml_string(&main.to_string_lossy())).expect("writing to a String");
            replaced = true;
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    ensure!(replaced, "the config has no top-level `main` to rewrite");
    Ok(out)
}

/// The key of a `key = value` line.
fn key_of(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    Some(key.trim())
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// `KEY=VALUE` lines in the dotenv syntax wrangler reads. dotenv has no escapes for quotes,
/// so a value is written bare when it can be, else inside whichever quote it lacks.
pub(crate) fn dev_vars_text(vars: &[(String, String)]) -> Result<String> {
    let mut out = String::new();
    for (key, value) in vars {
        ensure!(
            !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
            "worker var name {key:?} must be letters, digits and underscores"
        );
        ensure!(!value.contains(['\n', '\r']), "worker var {key} must be one line");
        let bare = !value.contains(['#', '"', '\'', '`']) && value.trim() == value;
        let quoted = if bare {
            value.clone()
        } else if !value.contains('"') {
            format!("\"{value}\"")
        } else if !value.contains('\'') {
            format!("'{value}'")
        } else {
            anyhow::bail!("worker var {key} cannot hold both kinds of quote in .dev.vars");
        };
        writeln!(out, "{key}={quoted}").expect("writing to a String");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(input: &str, expected: &str) {
        assert_eq!(rewrite_config(input, Path::new("/abs/shim.mjs")).unwrap(), expected);
    }

    #[test]
    fn main_becomes_absolute_and_build_disappears() {
        check(
            "name = \"w\"\nmain = \"w/build/worker/shim.mjs\"\n\n[build]\ncommand = \"cargo xtask build-worker w\"\nwatch_dir = [\"a\"]\n\n[vars]\nMAIN = \"x\"\n[[kv_namespaces]]\nbinding = \"K\"\n",
            "name = \"w\"\nmain = \"/abs/shim.mjs\"\n\n[vars]\nMAIN = \"x\"\n[[kv_namespaces]]\nbinding = \"K\"\n",
        );
    }

    #[test]
    fn keys_in_tables_are_left_alone() {
        check("main = \"a\"\n[x]\nmain = \"b\"\n", "main = \"/abs/shim.mjs\"\n[x]\nmain = \"b\"\n");
        assert!(rewrite_config("name = \"w\"\n", Path::new("/a")).is_err());
    }

    #[test]
    fn the_real_configs_keep_their_bindings() {
        let root = crate::repo_root();
        for file in ["wrangler-api.toml", "wrangler-consumer.toml", "dev/gateway/wrangler.toml"] {
            let text = std::fs::read_to_string(root.join(file)).unwrap();
            let out = rewrite_config(&text, Path::new("/abs/shim.mjs")).unwrap();
            assert!(!out.contains("[build]") && !out.contains("cargo xtask"), "{file}:\n{out}");
            assert_eq!(out.matches("main = ").count(), 1, "{file}");
            for binding in ["kv_namespaces", "queues", "triggers", "services"] {
                assert_eq!(text.contains(binding), out.contains(binding), "{file}: {binding}");
            }
        }
    }

    #[test]
    fn dev_vars_quote_only_when_needed() {
        let vars =
            |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>();
        assert_eq!(
            dev_vars_text(&vars(&[("A", "x,y"), ("B", "a #b"), ("C", "say \"hi\"")])).unwrap(),
            "A=x,y\nB=\"a #b\"\nC='say \"hi\"'\n"
        );
        assert!(dev_vars_text(&vars(&[("A", "x\ny")])).is_err());
        assert!(dev_vars_text(&vars(&[("A-B", "x")])).is_err());
    }
}
