//! Cron schedules for the daemon's jobs.
//!
//! Three forms are accepted, all evaluated in UTC:
//!
//! - 5 fields, crontab(5): `minute hour day-of-month month day-of-week`, e.g.
//!   `"0 2 * * *"`. Day of week is 0–7 with 0 and 7 = Sunday, 1 = Monday, as in
//!   crontab. It runs at second 0.
//! - 6 fields, `second minute hour day-of-month month day-of-week`, and
//! - 7 fields, the same plus a year, both in the syntax of the `cron` crate
//!   (Quartz style), where day of week is 1–7 with **1 = Sunday**.
//!   Names (`MON`, `Sun`, `mon-fri`) mean the same in every form; prefer them.
//! - `@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`.
//!
//! The `cron` crate numbers weekdays the Quartz way, so a 5-field expression is
//! not simply prefixed with "0 ": its day-of-week field is translated, or
//! `"0 5 * * 1"` would run on Sundays instead of Mondays.
//!
//! crontab runs a job when *either* a restricted day of month *or* a restricted
//! day of week matches; the `cron` crate requires both. A 5-field expression
//! that restricts both is therefore refused rather than silently reinterpreted.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Timelike, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest expression we accept; real ones are a few dozen characters.
const MAX_EXPRESSION: usize = 256;

/// A parsed cron schedule that remembers the text it was written as.
#[derive(Clone)]
pub struct Schedule {
    text: String,
    inner: cron::Schedule,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Err(
                "expected a cron expression such as \"0 2 * * *\", found an empty string".into(),
            );
        }
        if trimmed.len() > MAX_EXPRESSION {
            return Err(format!(
                "invalid cron expression: longer than {MAX_EXPRESSION} characters"
            ));
        }
        let fields: Vec<&str> = trimmed.split_whitespace().collect();
        let expression = if trimmed.starts_with('@') {
            trimmed.to_owned()
        } else {
            match fields.len() {
                5 => translate_crontab(&fields)?,
                6 | 7 => fields.join(" "),
                n => {
                    return Err(format!(
                        "invalid cron expression {trimmed:?}: expected 5 fields (minute hour day-of-month month \
                         day-of-week), 6 (with seconds first) or 7 (with a year last), found {n}"
                    ));
                }
            }
        };
        let inner = cron::Schedule::from_str(&expression).map_err(|e| {
            // The crate's message repeats the expression with a caret line; keep the explanation.
            let detail = e.to_string();
            let reason = detail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.trim().starts_with('^'));
            format!(
                "invalid cron expression {trimmed:?}: {}",
                reason.unwrap_or("not understood").trim()
            )
        })?;
        Ok(Schedule {
            text: trimmed.to_owned(),
            inner,
        })
    }

    /// The expression as written (trimmed).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The first time strictly after `after` at which the schedule fires, if any.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.inner.after(&after).next()
    }

    /// The last time at or before `at` at which the schedule fires, if any: the
    /// slot a daemon catching up after downtime runs (once, not once per missed slot).
    pub fn last_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        // Schedules fire on whole seconds, and the `cron` crate looks strictly
        // before a whole-second instant (but treats fractions of a second
        // differently): ask for the last firing before the next whole second.
        let whole = at.with_nanosecond(0).unwrap_or(at);
        let ceiling = whole.checked_add_signed(chrono::Duration::seconds(1))?;
        self.inner.after(&ceiling).next_back().filter(|t| *t <= at)
    }

    /// Every time strictly after `after` at which the schedule fires, in order.
    pub fn upcoming_after(&self, after: DateTime<Utc>) -> impl Iterator<Item = DateTime<Utc>> + '_ {
        self.inner.after(&after)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.text)
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Two schedules are equal when written the same; used to detect policy changes.
impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Schedule::parse(s)
    }
}

impl Serialize for Schedule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Schedule::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Turns a crontab(5) expression into the `cron` crate's 6-field form.
fn translate_crontab(fields: &[&str]) -> Result<String, String> {
    let [minute, hour, dom, month, dow] = fields else {
        unreachable!("called with five fields");
    };
    let restricted = |f: &str| f != "*" && f != "?";
    if restricted(dom) && restricted(dow) {
        return Err(format!(
            "cron expression {:?} restricts both day of month ({dom}) and day of week ({dow}): crontab would run \
             when either matches, custos would need both; restrict only one of them",
            fields.join(" ")
        ));
    }
    let dow = if restricted(dow) {
        translate_weekdays(dow)?
    } else {
        (*dow).to_owned()
    };
    Ok(format!("0 {minute} {hour} {dom} {month} {dow}"))
}

/// Expands a crontab day-of-week field (0–7, 0 and 7 = Sunday, names, ranges,
/// steps, lists) to the explicit list of `cron` crate ordinals (1 = Sunday).
fn translate_weekdays(field: &str) -> Result<String, String> {
    let bad = |why: &str| format!("invalid day of week {field:?}: {why}");
    let mut days = BTreeSet::new();
    for element in field.split(',') {
        let (range, step) = match element.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .ok()
                    .filter(|&s| s > 0)
                    .ok_or_else(|| bad("a step is a positive number"))?;
                (r, step)
            }
            None => (element, 1),
        };
        let (start, end) = if range == "*" {
            (0, 6)
        } else if let Some((a, b)) = range.split_once('-') {
            (
                weekday(a).ok_or_else(|| bad("expected 0-7 or a day name"))?,
                weekday(b).ok_or_else(|| bad("expected 0-7 or a day name"))?,
            )
        } else {
            let a = weekday(range).ok_or_else(|| bad("expected 0-7 or a day name"))?;
            // "5/2" means from 5 to the end of the week, stepping by 2.
            (a, if element.contains('/') { a.max(6) } else { a })
        };
        if start > end {
            return Err(bad(
                "a range must go from a lower to a higher day (0 = Sunday … 7 = Sunday)",
            ));
        }
        for day in (start..=end).step_by(step as usize) {
            days.insert(day % 7);
        }
    }
    if days.len() == 7 {
        return Ok("*".to_owned());
    }
    Ok(days
        .iter()
        .map(|d| (d + 1).to_string())
        .collect::<Vec<_>>()
        .join(","))
}

/// A crontab weekday: 0–7 (0 and 7 = Sunday) or a name.
fn weekday(text: &str) -> Option<u32> {
    if let Ok(n) = text.parse::<u32>() {
        return (n <= 7).then_some(n);
    }
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    const LONG: [&str; 7] = [
        "sunday",
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
    ];
    let lower = text.to_ascii_lowercase();
    NAMES
        .iter()
        .zip(LONG)
        .position(|(short, long)| lower == *short || lower == long)
        .map(|i| i as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{Datelike, TimeZone, Timelike, Weekday};

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, 0).unwrap()
    }

    #[test]
    fn five_fields_are_crontab() {
        // 2026-01-05 is a Monday.
        let s = Schedule::parse("0 5 * * 1").unwrap();
        let next: Vec<_> = s.upcoming_after(at(2026, 1, 1, 0, 0)).take(2).collect();
        assert_eq!(next, [at(2026, 1, 5, 5, 0), at(2026, 1, 12, 5, 0)]);
        assert_eq!(next[0].weekday(), Weekday::Mon);
        assert_eq!(s.as_str(), "0 5 * * 1");

        for sunday in ["0 4 * * 0", "0 4 * * 7", "0 4 * * sun", "0 4 * * SUN"] {
            let t = Schedule::parse(sunday)
                .unwrap()
                .next_after(at(2026, 1, 1, 0, 0))
                .unwrap();
            assert_eq!((t.weekday(), t.hour()), (Weekday::Sun, 4), "{sunday}");
        }
        let weekdays = Schedule::parse("30 3 * * 1-5").unwrap();
        let days: Vec<_> = weekdays
            .upcoming_after(at(2026, 1, 3, 0, 0))
            .take(5)
            .map(|t| t.weekday())
            .collect();
        assert_eq!(
            days,
            [
                Weekday::Mon,
                Weekday::Tue,
                Weekday::Wed,
                Weekday::Thu,
                Weekday::Fri
            ]
        );
        let weekend = Schedule::parse("0 0 * * 6-7").unwrap();
        let days: Vec<_> = weekend
            .upcoming_after(at(2026, 1, 1, 0, 0))
            .take(2)
            .map(|t| t.weekday())
            .collect();
        assert_eq!(days, [Weekday::Sat, Weekday::Sun]);
        let every_other = Schedule::parse("0 0 * * */2").unwrap();
        let days: Vec<_> = every_other
            .upcoming_after(at(2026, 1, 3, 12, 0))
            .take(4)
            .map(|t| t.weekday())
            .collect();
        assert_eq!(
            days,
            [Weekday::Sun, Weekday::Tue, Weekday::Thu, Weekday::Sat]
        );
    }

    #[test]
    fn next_after_is_strictly_after() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        assert_eq!(
            s.next_after(at(2026, 3, 1, 2, 0)),
            Some(at(2026, 3, 2, 2, 0))
        );
        assert_eq!(
            s.next_after(at(2026, 3, 1, 1, 59)),
            Some(at(2026, 3, 1, 2, 0))
        );
    }

    #[test]
    fn six_and_seven_fields_and_shorthands() {
        let s = Schedule::parse("30 0 2 * * *").unwrap();
        assert_eq!(
            s.next_after(at(2026, 3, 1, 0, 0)),
            Some(at(2026, 3, 1, 2, 0) + chrono::Duration::seconds(30))
        );
        let y = Schedule::parse("0 0 0 1 1 * 2030").unwrap();
        assert_eq!(
            y.next_after(at(2026, 3, 1, 0, 0)),
            Some(at(2030, 1, 1, 0, 0))
        );
        let d = Schedule::parse("@daily").unwrap();
        assert_eq!(
            d.next_after(at(2026, 3, 1, 5, 0)),
            Some(at(2026, 3, 2, 0, 0))
        );
    }

    #[test]
    fn refuses_bad_expressions() {
        let err = Schedule::parse("0 2 * *").unwrap_err();
        assert!(
            err.contains("expected 5 fields") && err.ends_with("found 4"),
            "{err}"
        );
        assert!(
            Schedule::parse("1 2 3 4 5 6 7 8")
                .unwrap_err()
                .ends_with("found 8")
        );
        assert!(Schedule::parse("").unwrap_err().contains("empty"));
        let err = Schedule::parse("0 25 * * *").unwrap_err();
        assert!(
            err.starts_with("invalid cron expression \"0 25 * * *\": Hours"),
            "{err}"
        );
        assert!(!err.contains('\n'), "{err}");
        assert!(
            Schedule::parse("0 2 * * 8")
                .unwrap_err()
                .contains("invalid day of week")
        );
        assert!(
            Schedule::parse("0 2 * * 5-1")
                .unwrap_err()
                .contains("lower to a higher")
        );
        let err = Schedule::parse("0 2 1 * mon").unwrap_err();
        assert!(err.contains("restricts both day of month"), "{err}");
        assert!(
            Schedule::parse(&"* ".repeat(200))
                .unwrap_err()
                .contains("longer than")
        );
    }

    #[test]
    fn last_at_or_before_includes_the_instant() {
        let s = Schedule::parse("0 2 * * *").unwrap();
        assert_eq!(
            s.last_at_or_before(at(2026, 3, 5, 2, 0)),
            Some(at(2026, 3, 5, 2, 0))
        );
        assert_eq!(
            s.last_at_or_before(at(2026, 3, 5, 1, 59)),
            Some(at(2026, 3, 4, 2, 0))
        );
        let every_2s = Schedule::parse("*/2 * * * * *").unwrap();
        let t = at(2026, 3, 5, 2, 0) + chrono::Duration::milliseconds(3_500);
        assert_eq!(
            every_2s.last_at_or_before(t),
            Some(at(2026, 3, 5, 2, 0) + chrono::Duration::seconds(2))
        );
        // A firing less than a second after the instant is not "at or before" it.
        let t = at(2026, 3, 5, 2, 0) + chrono::Duration::milliseconds(1_500);
        assert_eq!(every_2s.last_at_or_before(t), Some(at(2026, 3, 5, 2, 0)));
        let future_only = Schedule::parse("0 0 0 1 1 * 2030").unwrap();
        assert_eq!(future_only.last_at_or_before(at(2026, 1, 1, 0, 0)), None);
    }

    #[test]
    fn serializes_as_written() {
        let s = Schedule::parse(" 0 2 * * * ").unwrap();
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"0 2 * * *\"");
        assert_eq!(format!("{s:?}"), "Schedule(\"0 2 * * *\")");
    }
}
