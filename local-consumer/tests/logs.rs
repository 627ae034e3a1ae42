//! The daemon's log output, as a file or the journal receives it.

use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

#[test]
fn issue_17_logs_written_to_a_pipe_have_no_colour_codes() {
    let lock_dir = std::env::temp_dir().join(format!("lc-logs-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_local-consumer"))
        .env_clear()
        .env("CONSUMER_WORKER_URL", "http://127.0.0.1:9/consumer")
        .env("API_WORKER_URL", "http://127.0.0.1:9")
        .env("CONSUMER_TOKEN", "t")
        .env("ARRAKIS_URL", "http://127.0.0.1:9")
        .env("METRICS_ADDR", "off")
        .env("LOCK_DIR", &lock_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Nothing answers on port 9: the daemon logs that it waits for its dependencies.
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        out
    });
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let _ = child.kill();
    let _ = child.wait();
    let out = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    let _ = std::fs::remove_dir_all(&lock_dir);
    assert!(out.contains("waiting for dependencies"), "after {:?}: {out:?}", started.elapsed());
    assert!(!out.contains('\u{1b}'), "colour codes in a log file: {out:?}");
}
