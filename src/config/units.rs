//! Durations ("90d", "1h 30m") and sizes ("16MiB", "64 MiB", 16777216) as
//! operators write them in custos.toml and the tenant policies.
//!
//! Parsing accepts what `humantime` accepts; formatting is our own, because
//! humantime formats 90 days as "2months 29days 2h 52m 48s" (its month is
//! 30.44 days), and `custos tenant show` should print back what was written.

use std::time::Duration;

/// Longest duration or size text we try to parse; anything longer is hostile or a mistake.
const MAX_TEXT: usize = 64;

/// The longest duration custos accepts anywhere (policies, custos.toml, CLI
/// flags): 1000 years of 365.25 days, as humantime counts a year. Longer than
/// any retention, grace period or schedule anyone means, and short enough that
/// a date plus or minus it stays inside chrono's range (years ±262,143) for
/// every date custos handles (RFC 3339 years 0000 to 9999), so no time
/// arithmetic on a validated duration can overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(1_000 * 36_525 * 864);

/// Parses a human duration: `"90d"`, `"15m"`, `"1h 30m"`, `"2weeks"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(
            "expected a duration such as \"15m\", \"1h 30m\" or \"90d\", found an empty string"
                .into(),
        );
    }
    if trimmed.len() > MAX_TEXT {
        return Err(format!(
            "invalid duration: longer than {MAX_TEXT} characters"
        ));
    }
    let d = humantime::parse_duration(trimmed).map_err(|e| {
        format!("invalid duration {trimmed:?}: {e} (e.g. \"15m\", \"1h 30m\", \"90d\")")
    })?;
    if d > MAX_DURATION {
        return Err(format!(
            "invalid duration {trimmed:?}: longer than 1000 years ({}), the longest custos accepts",
            format_duration(MAX_DURATION)
        ));
    }
    Ok(d)
}

/// Formats a duration in the largest exact units: 90 days → "90d", 5400 s → "1h 30m".
pub fn format_duration(d: Duration) -> String {
    const UNITS: [(u64, &str); 4] = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let mut parts = Vec::new();
    let mut secs = d.as_secs();
    for (unit, suffix) in UNITS {
        if secs >= unit {
            parts.push(format!("{}{suffix}", secs / unit));
            secs %= unit;
        }
    }
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        if nanos.is_multiple_of(1_000_000) {
            parts.push(format!("{}ms", nanos / 1_000_000));
        } else if nanos.is_multiple_of(1_000) {
            parts.push(format!("{}us", nanos / 1_000));
        } else {
            parts.push(format!("{nanos}ns"));
        }
    }
    if parts.is_empty() {
        "0s".to_owned()
    } else {
        parts.join(" ")
    }
}

/// Parses a size: a byte count, or a number with a unit. Binary units (KiB,
/// MiB, GiB, TiB) are powers of 1024; SI units (kB, MB, GB, TB) powers of 1000;
/// K, M, G, T without "iB" are read as binary, as most tools do. Case of the
/// unit is not significant except that "b" alone is refused (bit or byte?).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    if trimmed.is_empty() || trimmed.len() > MAX_TEXT {
        return Err(format!(
            "expected a size such as \"16MiB\" or \"64 MiB\", found {:?}",
            truncate(text, 40)
        ));
    }
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(digits);
    let unit = unit.trim();
    let bad = || {
        format!(
            "invalid size {trimmed:?}: expected a whole number of bytes or <number> <unit> (B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
        )
    };
    let n: u64 = number.parse().map_err(|_| bad())?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" if unit != "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(multiplier)
        .ok_or_else(|| format!("invalid size {trimmed:?}: too large"))
}

/// Formats a size in the largest binary unit that divides it exactly: "16 MiB", "1000 B".
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if n != 0 && n.is_multiple_of(1u64 << shift) {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}

/// At most `max` characters of `s`, for echoing untrusted input in messages.
pub(crate) fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        let mut out: String = s.chars().take(max).collect();
        out.push('…');
        out
    }
}

/// Serde adapter: a `Duration` as its human form ("90d").
pub mod serde_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Serde adapter: an `Option<Duration>` as its human form, or null.
pub mod serde_opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&super::format_duration(*d)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|text| super::parse_duration(&text).map_err(serde::de::Error::custom))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_formats_durations() {
        for (text, secs, back) in [
            ("90d", 90 * 86_400, "90d"),
            ("15m", 900, "15m"),
            ("1h 30m", 5_400, "1h 30m"),
            ("2weeks", 14 * 86_400, "14d"),
            (" 10s ", 10, "10s"),
            ("0s", 0, "0s"),
        ] {
            let d = parse_duration(text).unwrap();
            assert_eq!(d, Duration::from_secs(secs), "{text}");
            assert_eq!(format_duration(d), back, "{text}");
        }
        assert_eq!(format_duration(Duration::from_millis(1_500)), "1s 500ms");
    }

    #[test]
    fn refuses_bad_durations() {
        assert!(parse_duration("").unwrap_err().contains("empty"));
        let err = parse_duration("90 dayz").unwrap_err();
        assert!(
            err.starts_with("invalid duration \"90 dayz\": unknown time unit \"dayz\""),
            "{err}"
        );
        assert!(parse_duration("-5m").is_err());
        // Past the cap, and past what humantime itself can hold.
        for long in [
            "300000years",
            "1001years",
            "365251d",
            "18446744073709551615s",
            "99999999999999999999s",
        ] {
            let err = parse_duration(long).unwrap_err();
            assert!(err.starts_with("invalid duration"), "{long}: {err}");
        }
        assert!(
            parse_duration("300000years")
                .unwrap_err()
                .contains("longer than 1000 years (365250d)")
        );
        assert_eq!(parse_duration("1000years").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("365250d").unwrap(), MAX_DURATION);
        assert!(
            parse_duration(&"1d ".repeat(100))
                .unwrap_err()
                .contains("longer than 64")
        );
    }

    #[test]
    fn parses_and_formats_sizes() {
        for (text, n) in [
            ("16MiB", 16 << 20),
            ("64 MiB", 64 << 20),
            ("4mib", 4 << 20),
            ("16M", 16 << 20),
            ("1 GiB", 1 << 30),
            ("16777216", 16 << 20),
            ("100 B", 100),
            ("5MB", 5_000_000),
        ] {
            assert_eq!(parse_size(text).unwrap(), n, "{text}");
        }
        assert_eq!(format_size(16 << 20), "16 MiB");
        assert_eq!(format_size(1000), "1000 B");
        assert_eq!(format_size(0), "0 B");
    }

    #[test]
    fn refuses_bad_sizes() {
        for bad in [
            "",
            "MiB",
            "16 Mb it",
            "1.5MiB",
            "-4MiB",
            "16b",
            "16 parsecs",
            "99999999999 TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        assert!(
            parse_size("99999999999 TiB")
                .unwrap_err()
                .contains("too large")
        );
    }
}
