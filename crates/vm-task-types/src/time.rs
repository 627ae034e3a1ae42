//! Millisecond UTC timestamps that travel as RFC 3339 strings.
//!
//! Written by hand rather than pulling `chrono` into the wasm workers: the civil-date
//! conversion is a dozen lines (Howard Hinnant's `days_from_civil`).

use std::fmt;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

/// Milliseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn from_millis(ms: u64) -> Self {
        Self(ms)
    }

    pub fn as_millis(self) -> u64 {
        self.0
    }

    pub fn plus_millis(self, ms: u64) -> Self {
        Self(self.0.saturating_add(ms))
    }

    pub fn plus_secs(self, secs: u64) -> Self {
        self.plus_millis(secs.saturating_mul(1000))
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub fn millis_since(self, earlier: Timestamp) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Parses `YYYY-MM-DDTHH:MM:SS[.fff]Z`, the form [`Display`](fmt::Display) writes.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
            return None;
        }
        if b[16] != b':' || *b.last()? != b'Z' {
            return None;
        }
        let num = |r: std::ops::Range<usize>| -> Option<u64> { s.get(r)?.parse().ok() };
        let (year, month, day) = (num(0..4)? as i64, num(5..7)?, num(8..10)?);
        let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
        if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
            return None;
        }
        if second > 60 {
            return None;
        }
        let millis = match &s[19..s.len() - 1] {
            "" => 0,
            frac if frac.starts_with('.') && frac.len() > 1 => {
                let digits = &frac[1..];
                if !digits.bytes().all(|c| c.is_ascii_digit()) {
                    return None;
                }
                let padded = format!("{digits:0<3}");
                padded[..3].parse().ok()?
            }
            _ => return None,
        };
        let days = days_from_civil(year, month as u32, day as u32);
        if days < 0 {
            return None;
        }
        let secs = days as u64 * 86_400 + hour * 3600 + minute * 60 + second;
        Some(Self(secs * 1000 + millis))
    }
}

impl Timestamp {
    /// RFC 3339 to the second (`2025-06-02T17:46:29Z`), as Go's `time.RFC3339` writes a UTC
    /// time; [`Display`](fmt::Display) adds milliseconds.
    pub fn to_rfc3339_secs(self) -> String {
        let (date, time) = self.civil();
        format!("{date}T{time}Z")
    }

    /// `YYYY-MM-DD` and `HH:MM:SS` of the instant, UTC.
    fn civil(self) -> (String, String) {
        let secs = self.0 / 1000;
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let rem = secs % 86_400;
        (format!("{year:04}-{month:02}-{day:02}"), format!("{:02}:{:02}:{:02}", rem / 3600, (rem / 60) % 60, rem % 60))
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (date, time) = self.civil();
        write!(f, "{date}T{time}.{:03}Z", self.0 % 1000)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        Timestamp::parse_rfc3339(&s).ok_or_else(|| de::Error::custom(format!("invalid RFC 3339 timestamp: {s:?}")))
    }
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(Timestamp(0).to_string(), "1970-01-01T00:00:00.000Z");
        // 2025-06-02T17:46:29Z, the timestamp in BEHAVIOR.md's health example.
        assert_eq!(Timestamp(1_748_886_389_000).to_string(), "2025-06-02T17:46:29.000Z");
        assert_eq!(Timestamp(951_782_400_123).to_string(), "2000-02-29T00:00:00.123Z");
        assert_eq!(Timestamp(1_748_886_389_999).to_rfc3339_secs(), "2025-06-02T17:46:29Z");
    }

    #[test]
    fn parses_what_it_formats_and_seconds_only_forms() {
        for ms in [0, 1, 951_782_400_123, 1_748_886_389_000, 4_102_444_799_999] {
            let t = Timestamp(ms);
            assert_eq!(Timestamp::parse_rfc3339(&t.to_string()), Some(t));
        }
        assert_eq!(Timestamp::parse_rfc3339("2025-06-02T17:46:29Z"), Some(Timestamp(1_748_886_389_000)));
        assert_eq!(Timestamp::parse_rfc3339("2025-06-02T17:46:29.5Z"), Some(Timestamp(1_748_886_389_500)));
    }

    #[test]
    fn rejects_malformed_timestamps() {
        for bad in [
            "",
            "2025-06-02",
            "2025-13-02T00:00:00Z",
            "2025-06-02T00:00:00",
            "x025-06-02T00:00:00Z",
            "2025-06-02T00:00:00.Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(bad), None, "{bad}");
        }
    }
}
