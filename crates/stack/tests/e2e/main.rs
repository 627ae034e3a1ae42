//! The end-to-end tests: one test binary (`e2e`), one module per area, each test starting its
//! own local stack ([`stack::Stack`]: both workers under `wrangler dev`, the Arrakis simulator,
//! the daemon) on free ports and driving it over HTTP as a user would.
//!
//! Every test is `#[ignore]`d, so `cargo test --workspace` stays native. Run them with
//! `cargo xtask e2e` (builds the workers and release binaries first, then runs
//! `cargo test --release -p stack --test e2e -- --ignored`, skipping the soak and the fuzzing);
//! one module or test with `cargo test --release -p stack --test e2e -- --ignored trust::`.
//! `cargo xtask soak` runs `soak::`, `cargo xtask fuzz` runs `fuzz::`.
//!
//! To add a module: create `tests/e2e/<area>.rs` with a `//!` line saying what it attacks,
//! add `mod <area>;` below and `use crate::support::*;` for the shared helpers, and mark each
//! test `#[tokio::test]` and `#[ignore = "needs the local stack: cargo xtask e2e"]`. A helper
//! used by several modules goes in `support.rs`; one used by a single module stays in it.
//! `cargo xtask e2e` skips by substring, so no module name may end in `soak` or `fuzz`.

mod bad_input;
mod cancel_race;
mod daemon;
mod dashboard;
mod edge;
mod faults;
mod files_and_long_commands;
mod finding;
mod fuzz;
mod service;
mod soak;
mod support;
mod trust;
mod vmctl;
mod webhooks;
