//! Reading typed values out of spanned TOML, collecting every error with its
//! file and position instead of stopping at the first.
//!
//! serde would stop at the first problem of a file and cannot merge a tenant
//! file over `defaults.toml` while remembering which file set which value, so
//! the loaders walk `toml::de::DeTable` trees by hand through these helpers. A
//! [`Table`] is a stack of layers (tenant file first, then defaults); a key is
//! looked up in each layer in turn, which is exactly a per-key deep merge for
//! the two levels a policy has (sections of scalars and arrays).

use std::fmt::Display;
use std::time::Duration;

use toml::de::{DeTable, DeValue};

use super::diag::{PolicyError, SourceText};
use super::schedule::Schedule;
use super::units::{self, truncate};

/// Collected errors and warnings of one load, plus the files they point into.
pub(crate) struct Diags<'s> {
    pub files: &'s [SourceText],
    pub errors: Vec<PolicyError>,
    pub warnings: Vec<PolicyError>,
}

impl<'s> Diags<'s> {
    pub fn new(files: &'s [SourceText]) -> Self {
        Diags {
            files,
            errors: Vec::new(),
            warnings: Vec::new(),
        }
    }

    /// An error at a byte offset of file number `file` (no offset: the whole file).
    pub fn error(&mut self, file: usize, offset: Option<usize>, message: impl Into<String>) {
        let e = self.files[file].error_at(offset, message);
        self.errors.push(e);
    }

    pub fn warn(&mut self, file: usize, offset: Option<usize>, message: impl Into<String>) {
        let e = self.files[file].error_at(offset, message);
        self.warnings.push(e);
    }

    /// An error about a value, prefixed with its key path.
    pub fn err(&mut self, item: &Item<'_>, message: impl Display) {
        self.error(
            item.file,
            Some(item.start),
            format!("{}: {message}", item.path),
        );
    }

    /// An error about a required key that no layer of `table` sets. It points
    /// at the table's header where there is one, else at the whole file.
    pub fn missing(&mut self, table: &Table<'_>, key: &str, explanation: &str) {
        let path = table.child_path(key);
        if let Some((file, offset)) = table.anchor {
            self.error(file, offset, format!("{path}: missing; {explanation}"));
        }
    }

    pub fn str<'a>(&mut self, item: &Item<'a>) -> Option<&'a str> {
        match item.value {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.err(
                    item,
                    format!("expected a string, found {}", describe(other)),
                );
                None
            }
        }
    }

    pub fn bool(&mut self, item: &Item<'_>) -> Option<bool> {
        match item.value {
            DeValue::Boolean(b) => Some(*b),
            other => {
                self.err(
                    item,
                    format!("expected true or false, found {}", describe(other)),
                );
                None
            }
        }
    }

    /// A non-negative integer of at most `max`.
    pub fn uint(&mut self, item: &Item<'_>, max: u64) -> Option<u64> {
        let n = match item.value {
            DeValue::Integer(i) => integer(i.as_str(), i.radix()),
            other => {
                self.err(
                    item,
                    format!("expected a non-negative integer, found {}", describe(other)),
                );
                return None;
            }
        };
        match n {
            Some(n) if n < 0 => {
                self.err(item, format!("expected a non-negative integer, found {n}"))
            }
            Some(n) if n > i128::from(max) => {
                self.err(item, format!("must be at most {max}, found {n}"))
            }
            Some(n) => return Some(n as u64),
            None => self.err(item, format!("must be at most {max}")),
        }
        None
    }

    /// An integer within `lo..=hi`.
    pub fn int_in(&mut self, item: &Item<'_>, lo: i64, hi: i64) -> Option<i64> {
        let n = match item.value {
            DeValue::Integer(i) => integer(i.as_str(), i.radix()),
            other => {
                self.err(
                    item,
                    format!(
                        "expected an integer from {lo} to {hi}, found {}",
                        describe(other)
                    ),
                );
                return None;
            }
        };
        match n {
            Some(n) if (i128::from(lo)..=i128::from(hi)).contains(&n) => Some(n as i64),
            Some(n) => {
                self.err(item, format!("must be from {lo} to {hi}, found {n}"));
                None
            }
            None => {
                self.err(item, format!("must be from {lo} to {hi}"));
                None
            }
        }
    }

    /// A number (integers are accepted where a float is expected: `1` for `1.0`).
    pub fn float(&mut self, item: &Item<'_>) -> Option<f64> {
        let parsed = match item.value {
            DeValue::Float(f) => f.as_str().parse::<f64>().ok(),
            DeValue::Integer(i) => integer(i.as_str(), i.radix()).map(|n| n as f64),
            other => {
                self.err(
                    item,
                    format!("expected a number, found {}", describe(other)),
                );
                return None;
            }
        };
        match parsed {
            Some(f) if f.is_finite() => Some(f),
            _ => {
                self.err(item, "expected a finite number");
                None
            }
        }
    }

    pub fn duration(&mut self, item: &Item<'_>) -> Option<Duration> {
        let text = self.typed_str(item, "a duration string such as \"15m\" or \"90d\"")?;
        units::parse_duration(text)
            .map_err(|e| self.err(item, e))
            .ok()
    }

    /// A duration that must be longer than zero.
    pub fn positive_duration(&mut self, item: &Item<'_>) -> Option<Duration> {
        let d = self.duration(item)?;
        if d.is_zero() {
            self.err(item, "must be longer than zero");
            return None;
        }
        Some(d)
    }

    pub fn size(&mut self, item: &Item<'_>) -> Option<u64> {
        match item.value {
            DeValue::Integer(_) => self.uint(item, u64::MAX),
            DeValue::String(s) => units::parse_size(s).map_err(|e| self.err(item, e)).ok(),
            other => {
                self.err(
                    item,
                    format!(
                        "expected a size such as \"16MiB\" or a number of bytes, found {}",
                        describe(other)
                    ),
                );
                None
            }
        }
    }

    /// A cron schedule; `"off"` is no schedule, to switch off one inherited from defaults.toml.
    pub fn schedule(&mut self, item: &Item<'_>) -> Option<Schedule> {
        let text = self.typed_str(
            item,
            "a cron expression string such as \"0 2 * * *\" (or \"off\")",
        )?;
        if text.trim() == "off" {
            return None;
        }
        let schedule = Schedule::parse(text).map_err(|e| self.err(item, e)).ok()?;
        let now = chrono::Utc::now();
        if schedule.next_after(now).is_none() {
            self.err(
                item,
                format!(
                    "{:?} never fires after {} (use \"off\" for no schedule)",
                    schedule.as_str(),
                    now.format("%Y-%m-%d")
                ),
            );
            return None;
        }
        Some(schedule)
    }

    /// An array whose every element is a string; each comes with its own item
    /// so later checks can point at the element.
    pub fn str_array<'a>(&mut self, item: &Item<'a>) -> Option<Vec<(Item<'a>, &'a str)>> {
        let DeValue::Array(array) = item.value else {
            self.err(
                item,
                format!(
                    "expected an array of strings, found {}",
                    describe(item.value)
                ),
            );
            return None;
        };
        let mut out = Vec::with_capacity(array.len());
        let mut ok = true;
        for (i, element) in array.iter().enumerate() {
            let sub = Item {
                file: item.file,
                path: format!("{}[{i}]", item.path),
                start: element.span().start,
                value: element.get_ref(),
            };
            match element.get_ref() {
                DeValue::String(s) => out.push((sub, s.as_ref())),
                other => {
                    self.err(
                        &sub,
                        format!("expected a string, found {}", describe(other)),
                    );
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn typed_str<'a>(&mut self, item: &Item<'a>, expected: &str) -> Option<&'a str> {
        match item.value {
            DeValue::String(s) => Some(s.as_ref()),
            other => {
                self.err(
                    item,
                    format!("expected {expected}, found {}", describe(other)),
                );
                None
            }
        }
    }
}

/// A value found under a key, with the file and offset it came from.
#[derive(Clone)]
pub(crate) struct Item<'a> {
    pub file: usize,
    /// Key path for messages: `retention.keep_daily`, `sources[1].exclude[0]`.
    pub path: String,
    pub start: usize,
    pub value: &'a DeValue<'a>,
}

/// A table seen through its layers: the first layer that has a key wins.
#[derive(Clone)]
pub(crate) struct Table<'a> {
    pub path: String,
    /// Where "missing key" errors point: the table's header, if it has one.
    pub anchor: Option<(usize, Option<usize>)>,
    layers: Vec<(usize, &'a DeTable<'a>)>,
}

impl<'a> Table<'a> {
    /// The document root of one or more files, highest priority first.
    pub fn root(layers: Vec<(usize, &'a DeTable<'a>)>) -> Self {
        let anchor = layers.first().map(|&(file, _)| (file, None));
        Table {
            path: String::new(),
            anchor,
            layers,
        }
    }

    pub fn child_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// The value of `key` from the first layer that sets it.
    pub fn get(&self, key: &str) -> Option<Item<'a>> {
        self.layers
            .iter()
            .find_map(|&(file, table)| self.lookup(file, table, key))
    }

    /// The value of `key` in the first (highest-priority) layer only.
    pub fn get_top(&self, key: &str) -> Option<Item<'a>> {
        let &(file, table) = self.layers.first()?;
        self.lookup(file, table, key)
    }

    fn lookup(&self, file: usize, table: &'a DeTable<'a>, key: &str) -> Option<Item<'a>> {
        table
            .iter()
            .find(|(k, _)| k.get_ref() == key)
            .map(|(_, v)| Item {
                file,
                path: self.child_path(key),
                start: v.span().start,
                value: v.get_ref(),
            })
    }

    /// Reports every key of every layer that is not in `allowed`.
    pub fn check_keys(&self, d: &mut Diags<'_>, allowed: &[&str]) {
        for &(file, table) in &self.layers {
            for (key, _) in table.iter() {
                let name: &str = key.get_ref();
                if allowed.contains(&name) {
                    continue;
                }
                let hint = match suggest(name, allowed) {
                    Some(s) => format!("did you mean {s:?}?"),
                    None => format!("expected one of: {}", allowed.join(", ")),
                };
                let path = self.child_path(&truncate(name, 60));
                d.error(
                    file,
                    Some(key.span().start),
                    format!("{path}: unknown key ({hint})"),
                );
            }
        }
    }

    /// The section `key` of every layer that has it; a non-table is an error.
    pub fn section(&self, d: &mut Diags<'_>, key: &str) -> Table<'a> {
        let mut out = Table {
            path: self.child_path(key),
            anchor: None,
            layers: Vec::new(),
        };
        for &(file, table) in &self.layers {
            let Some(item) = self.lookup(file, table, key) else {
                continue;
            };
            match item.value {
                DeValue::Table(t) => {
                    out.anchor.get_or_insert((file, Some(item.start)));
                    out.layers.push((file, t));
                }
                other => d.err(
                    &item,
                    format!("expected a table, found {}", describe(other)),
                ),
            }
        }
        if out.anchor.is_none() {
            out.anchor = self.anchor.map(|(file, _)| (file, None));
        }
        out
    }

    /// An array of tables (`[[sources]]`) from the first layer that sets it,
    /// each element as a single-layer table.
    pub fn array_of_tables(
        &self,
        d: &mut Diags<'_>,
        key: &str,
    ) -> Option<(Item<'a>, Vec<Table<'a>>)> {
        let item = self.get(key)?;
        let DeValue::Array(array) = item.value else {
            d.err(
                &item,
                format!(
                    "expected an array of tables ([[{key}]]), found {}",
                    describe(item.value)
                ),
            );
            return Some((item, Vec::new()));
        };
        let mut tables = Vec::with_capacity(array.len());
        for (i, element) in array.iter().enumerate() {
            let path = format!("{}[{i}]", item.path);
            match element.get_ref() {
                DeValue::Table(t) => tables.push(Table {
                    path,
                    anchor: Some((item.file, Some(element.span().start))),
                    layers: vec![(item.file, t)],
                }),
                other => d.error(
                    item.file,
                    Some(element.span().start),
                    format!("{path}: expected a table, found {}", describe(other)),
                ),
            }
        }
        Some((item, tables))
    }
}

/// "a string", "an integer", … for type errors. Scalars also show their value.
pub(crate) fn describe(value: &DeValue<'_>) -> String {
    match value {
        DeValue::String(s) => format!("a string ({:?})", truncate(s, 40)),
        DeValue::Integer(i) => format!("an integer ({})", truncate(&i.to_string(), 40)),
        DeValue::Float(f) => format!("a float ({})", truncate(f.as_str(), 40)),
        DeValue::Boolean(b) => format!("a boolean ({b})"),
        DeValue::Datetime(_) => "a datetime".into(),
        DeValue::Array(_) => "an array".into(),
        DeValue::Table(_) => "a table".into(),
    }
}

/// The value of a TOML integer as written (sign, radix); `None` when it does
/// not fit in an i128, which no setting needs.
fn integer(digits: &str, radix: u32) -> Option<i128> {
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    i128::from_str_radix(digits, radix).ok()
}

/// The allowed key closest to a misspelt one, if it is close enough to be a typo.
fn suggest<'k>(name: &str, allowed: &[&'k str]) -> Option<&'k str> {
    if name.len() > 64 {
        return None;
    }
    allowed
        .iter()
        .map(|&k| (edit_distance(name, k), k))
        .filter(|&(d, k)| d <= 2.max(k.len() / 4))
        .min_by_key(|&(d, _)| d)
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with<R>(text: &str, f: impl FnOnce(&mut Diags<'_>, Table<'_>) -> R) -> (R, Vec<String>) {
        let files = [SourceText::new("t.toml".into(), text.to_owned())];
        let doc = DeTable::parse(&files[0].text).unwrap();
        let mut d = Diags::new(&files);
        let r = f(&mut d, Table::root(vec![(0, doc.get_ref())]));
        (r, d.errors.iter().map(|e| e.to_string()).collect())
    }

    #[test]
    fn typed_values_and_their_errors() {
        let text = "a = 5\nb = -1\nc = \"x\"\nd = 1e400\ne = 0x10\nf = 99999999999999999999999999999999999999999\n";
        let (vals, errs) = with(text, |d, t| {
            (
                d.uint(&t.get("a").unwrap(), 10),
                d.uint(&t.get("b").unwrap(), 10),
                d.uint(&t.get("c").unwrap(), 10),
                d.float(&t.get("d").unwrap()),
                d.uint(&t.get("e").unwrap(), 100),
                d.uint(&t.get("f").unwrap(), 10),
                d.int_in(&t.get("a").unwrap(), 1, 3),
            )
        });
        assert_eq!(vals, (Some(5), None, None, None, Some(16), None, None));
        assert_eq!(
            errs,
            [
                "t.toml:2:5: b: expected a non-negative integer, found -1",
                "t.toml:3:5: c: expected a non-negative integer, found a string (\"x\")",
                "t.toml:4:5: d: expected a finite number",
                "t.toml:6:5: f: must be at most 10",
                "t.toml:1:5: a: must be from 1 to 3, found 5",
            ]
        );
    }

    #[test]
    fn unknown_keys_suggest_the_nearest() {
        let (_, mut errs) = with("[retention]\nkeep_dayly = 3\nfrobnicate = 1\n", |d, t| {
            t.check_keys(d, &["retention"]);
            t.section(d, "retention")
                .check_keys(d, &["keep_daily", "keep_last"]);
        });
        errs.sort();
        assert_eq!(
            errs,
            [
                "t.toml:2:1: retention.keep_dayly: unknown key (did you mean \"keep_daily\"?)",
                "t.toml:3:1: retention.frobnicate: unknown key (expected one of: keep_daily, keep_last)",
            ]
        );
    }

    #[test]
    fn layers_merge_per_key() {
        let files = [
            SourceText::new("top.toml".into(), "[s]\na = 1\n".into()),
            SourceText::new("base.toml".into(), "[s]\na = 2\nb = 3\n".into()),
        ];
        let top = DeTable::parse(&files[0].text).unwrap();
        let base = DeTable::parse(&files[1].text).unwrap();
        let mut d = Diags::new(&files);
        let root = Table::root(vec![(0, top.get_ref()), (1, base.get_ref())]);
        let s = root.section(&mut d, "s");
        let a = s.get("a").unwrap();
        let b = s.get("b").unwrap();
        assert_eq!((a.file, d.uint(&a, 9)), (0, Some(1)));
        assert_eq!((b.file, d.uint(&b, 9)), (1, Some(3)));
        assert_eq!(b.path, "s.b");
        assert!(d.errors.is_empty());
    }

    #[test]
    fn edit_distance_works() {
        assert_eq!(edit_distance("keep_dayly", "keep_daily"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(suggest("shedule", &["schedule", "prune"]), Some("schedule"));
        assert_eq!(suggest("zzz", &["schedule", "prune"]), None);
    }
}
