//! `vmctl`, the command-line client of the VM task API.
//!
//! [`cli`] declares the command line, [`commands`] carries each command out through
//! [`client::ApiClient`], [`render`] draws the human tables and [`error`] words every failure
//! with its exit code. The binary (`main.rs`) only loads `.env`, parses and prints.

pub mod cli;
pub mod client;
pub mod commands;
pub mod error;
pub mod render;
pub mod spinner;

pub use commands::run;
