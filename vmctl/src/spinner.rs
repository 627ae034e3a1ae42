//! A one-line progress indicator on stderr, drawn only when stderr is a terminal: piped or
//! redirected output stays clean.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use tokio::{sync::watch, task::JoinHandle};

const FRAMES: [char; 10] = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];

#[derive(Debug)]
pub struct Spinner {
    running: Option<(watch::Sender<String>, JoinHandle<()>)>,
}

impl Spinner {
    /// Starts drawing `label: <state>` unless stderr is not a terminal.
    pub fn start(label: String, state: &str) -> Self {
        if !std::io::stderr().is_terminal() {
            return Self { running: None };
        }
        let (sender, mut receiver) = watch::channel(state.to_owned());
        let started = Instant::now();
        let handle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for frame in FRAMES.iter().cycle() {
                tick.tick().await;
                let state = receiver.borrow_and_update().clone();
                let elapsed = crate::render::duration(started.elapsed().as_millis() as u64);
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "\r\x1b[2K{frame} {label}: {state} ({elapsed})");
                let _ = err.flush();
            }
        });
        Self { running: Some((sender, handle)) }
    }

    pub fn set(&self, state: &str) {
        if let Some((sender, _)) = &self.running {
            sender.send_replace(state.to_owned());
        }
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some((_, handle)) = self.running.take() {
            handle.abort();
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}
