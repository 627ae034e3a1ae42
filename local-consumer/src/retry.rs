//! Retry and backoff for every call the daemon repeats: Arrakis calls in the executor, polls,
//! reports and claims in the daemon. One formula, one random source.
//!
//! The delay before retry `n` is full jitter, uniform in `[0, min(cap, base·2^(n−1))]`, so
//! daemons that failed together do not retry together. The random source is a [`Jitter`]
//! seeded once per process (or by a test or simulation, which then replays exactly).

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        atomic::{AtomicU64, Ordering::Relaxed},
        Arc,
    },
    time::Duration,
};

/// How often and how patiently a call is repeated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 means the call is made once.
    pub retries: u32,
    /// Ceiling of the first retry's delay; it doubles per retry.
    pub base: Duration,
    /// The ceiling never exceeds this.
    pub cap: Duration,
}

impl RetryPolicy {
    /// Upper bound of the delay before retry `attempt` (1 for the first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(30);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// The delay before retry `attempt`: uniform in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, jitter: &Jitter) -> Duration {
        let ceiling = self.ceiling(attempt).as_nanos().min(u64::MAX as u128 - 1) as u64;
        Duration::from_nanos(jitter.up_to(ceiling))
    }

    /// Whether attempt number `attempt` (1 for the first call) may be followed by another.
    pub fn allows_retry_after(&self, attempt: u32) -> bool {
        attempt <= self.retries
    }
}

/// A shared, lock-free source of jitter (SplitMix64 over an atomic counter). Cheap to clone;
/// clones draw from one sequence.
#[derive(Debug, Clone)]
pub struct Jitter(Arc<AtomicU64>);

impl Jitter {
    /// A sequence that is the same on every run with this seed.
    pub fn seeded(seed: u64) -> Self {
        Self(Arc::new(AtomicU64::new(seed)))
    }

    /// A sequence seeded from the process's random hashing keys.
    pub fn from_entropy() -> Self {
        Self::seeded(RandomState::new().hash_one(std::process::id()))
    }

    fn next_u64(&self) -> u64 {
        // SplitMix64: a Weyl sequence through a 64-bit finalizer.
        let mut z = self.0.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, max]`, both ends included (modulo bias below 2^-40 for our ranges).
    pub fn up_to(&self, max: u64) -> u64 {
        self.next_u64() % (max + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy =
        RetryPolicy { retries: 3, base: Duration::from_millis(100), cap: Duration::from_millis(1000) };

    #[test]
    fn the_ceiling_doubles_per_retry_up_to_the_cap() {
        let ceilings: Vec<u64> = (1..=6).map(|n| POLICY.ceiling(n).as_millis() as u64).collect();
        assert_eq!(ceilings, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(POLICY.ceiling(u32::MAX), POLICY.cap, "no overflow for absurd attempt numbers");
    }

    #[test]
    fn delays_are_uniform_from_zero_to_the_ceiling() {
        let jitter = Jitter::seeded(7);
        let delays: Vec<Duration> = (0..10_000).map(|_| POLICY.delay(4, &jitter)).collect();
        let ceiling = POLICY.ceiling(4);
        assert!(delays.iter().all(|d| *d <= ceiling));
        // Full jitter reaches down to zero: the old formula floored at a quarter of the cap.
        assert!(delays.iter().any(|d| *d < ceiling / 20), "some delays are near 0");
        assert!(delays.iter().any(|d| *d > ceiling * 19 / 20), "some delays are near the ceiling");
        let mean = delays.iter().sum::<Duration>() / delays.len() as u32;
        let half = ceiling / 2;
        assert!(mean > half * 95 / 100 && mean < half * 105 / 100, "mean {mean:?} is about {half:?}");
    }

    #[test]
    fn a_seed_replays_the_same_delays() {
        let (a, b) = (Jitter::seeded(42), Jitter::seeded(42));
        let first: Vec<Duration> = (1..50).map(|n| POLICY.delay(n, &a)).collect();
        let second: Vec<Duration> = (1..50).map(|n| POLICY.delay(n, &b)).collect();
        assert_eq!(first, second);
        let c = Jitter::seeded(43);
        let other: Vec<Duration> = (1..50).map(|n| POLICY.delay(n, &c)).collect();
        assert_ne!(first, other);
    }

    #[test]
    fn retries_counts_calls_after_the_first() {
        assert!(POLICY.allows_retry_after(3));
        assert!(!POLICY.allows_retry_after(4));
        assert!(!RetryPolicy { retries: 0, ..POLICY }.allows_retry_after(1));
    }
}
