//! The executor the simulator-backed tests drive: quick retries with a seeded jitter, images
//! allowed under `/opt/arrakis`, and the simulator's default image names.

use std::{path::PathBuf, time::Duration};

use arrakis_client::ArrakisClient;
use local_consumer::{
    executor::{BootDefaults, Executor, RetryPolicy},
    images::ImagePolicy,
    metrics::Metrics,
    retry::Jitter,
};

pub fn executor(url: &str) -> Executor {
    Executor {
        arrakis: ArrakisClient::new(url).unwrap(),
        defaults: BootDefaults {
            kernel: "vmlinux.bin".into(),
            rootfs: "rootfs.img".into(),
            initramfs: "initramfs.cpio.gz".into(),
        },
        images: ImagePolicy::new([PathBuf::from("/opt/arrakis")]),
        retry: RetryPolicy { retries: 3, base: Duration::from_millis(1), cap: Duration::from_millis(5) },
        jitter: Jitter::seeded(1),
        metrics: Metrics::new(),
    }
}
