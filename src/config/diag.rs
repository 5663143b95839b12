//! Errors that point into a file, rendered the way compilers do, so an
//! operator (or an editor) can jump to the line:
//!
//! ```text
//! policies/acme.toml:12:14: retention.keep_daily: expected a non-negative integer, found -1
//! ```

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// One problem in a configuration or policy file. `line` and `column` are
/// 1-based (column counts characters); they are absent for problems of the
/// file as a whole (unreadable, a required key missing).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl PolicyError {
    /// A problem of the whole file, without a position.
    pub fn file(file: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        PolicyError {
            file: file.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for PolicyError {}

/// Every problem found while loading policies (never just the first), sorted
/// by file and position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(Vec<PolicyError>);

impl PolicyErrors {
    pub fn new(mut errors: Vec<PolicyError>) -> Self {
        errors.sort();
        errors.dedup();
        PolicyErrors(errors)
    }

    pub fn errors(&self) -> &[PolicyError] {
        &self.0
    }

    pub fn into_errors(self) -> Vec<PolicyError> {
        self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

impl From<PolicyErrors> for crate::Error {
    fn from(e: PolicyErrors) -> Self {
        crate::Error::Policy(e.to_string())
    }
}

/// Largest configuration or policy file we read. Real ones are a few KiB; the
/// cap keeps a hostile or mistaken file (a disk image named `x.toml`) from
/// being read into memory.
pub const MAX_FILE_LEN: u64 = 1 << 20;

/// A file's text with an index of line starts, to turn byte offsets (TOML
/// spans) into line and column.
#[derive(Debug)]
pub(crate) struct SourceText {
    pub path: PathBuf,
    pub text: String,
    line_starts: Vec<usize>,
}

impl SourceText {
    pub fn new(path: PathBuf, text: String) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceText {
            path,
            text,
            line_starts,
        }
    }

    /// Reads a file of at most [`MAX_FILE_LEN`] bytes that must be UTF-8.
    pub fn read(path: &Path) -> Result<Self, PolicyError> {
        let fail = |message: String| Err(PolicyError::file(path, message));
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => return fail(format!("cannot read: {e}")),
        };
        let mut bytes = Vec::new();
        if let Err(e) = file.take(MAX_FILE_LEN + 1).read_to_end(&mut bytes) {
            return fail(format!("cannot read: {e}"));
        }
        if bytes.len() as u64 > MAX_FILE_LEN {
            return fail(format!(
                "file is larger than {} KiB; refusing to parse it",
                MAX_FILE_LEN >> 10
            ));
        }
        match String::from_utf8(bytes) {
            Ok(text) => Ok(SourceText::new(path.to_path_buf(), text)),
            Err(e) => {
                let valid = e.utf8_error().valid_up_to();
                let line = e.as_bytes()[..valid]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1;
                Err(PolicyError {
                    file: path.to_path_buf(),
                    line: Some(line),
                    column: None,
                    message: "file is not valid UTF-8".into(),
                })
            }
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub fn position(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        (line, self.text[start..offset].chars().count() + 1)
    }

    /// An error at a byte offset of this file.
    pub fn error_at(&self, offset: Option<usize>, message: impl Into<String>) -> PolicyError {
        let (line, column) = match offset {
            Some(o) => {
                let (l, c) = self.position(o);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        PolicyError {
            file: self.path.clone(),
            line,
            column,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let s = SourceText::new("p.toml".into(), "a = 1\nné = \"x\"\n\nlast".into());
        assert_eq!(s.position(0), (1, 1));
        assert_eq!(s.position(4), (1, 5));
        assert_eq!(s.position(6), (2, 1));
        // "né = " is 6 bytes but 5 characters.
        assert_eq!(s.position(12), (2, 6));
        assert_eq!(s.position(16), (3, 1));
        assert_eq!(s.position(17), (4, 1));
        assert_eq!(s.position(10_000), (4, 5));
        // Inside a multi-byte character: rounds down to its start.
        assert_eq!(s.position(8), (2, 2));
    }

    #[test]
    fn renders_like_a_compiler() {
        let e = SourceText::new(
            "policies/acme.toml".into(),
            "x\n        keep_daily = -1".into(),
        )
        .error_at(
            Some(15),
            "retention.keep_daily: expected a non-negative integer",
        );
        assert_eq!(
            e.to_string(),
            "policies/acme.toml:2:14: retention.keep_daily: expected a non-negative integer"
        );
        assert_eq!(
            PolicyError::file("p/a.toml", "tenant: missing").to_string(),
            "p/a.toml: tenant: missing"
        );
        let errs = PolicyErrors::new(vec![
            PolicyError::file("b.toml", "two"),
            PolicyError::file("a.toml", "one"),
            PolicyError::file("a.toml", "one"),
        ]);
        assert_eq!(errs.to_string(), "a.toml: one\nb.toml: two");
        assert_eq!(errs.errors().len(), 2);
    }

    #[test]
    fn reading_refuses_large_and_non_utf8_files() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_FILE_LEN + 1) as usize]).unwrap();
        assert!(
            SourceText::read(&big)
                .unwrap_err()
                .message
                .contains("larger than 1024 KiB")
        );
        let latin1 = dir.path().join("latin1.toml");
        std::fs::write(&latin1, b"a = 1\nb = \"\xe9\"\n").unwrap();
        let err = SourceText::read(&latin1).unwrap_err();
        assert_eq!(
            (err.line, err.message.as_str()),
            (Some(2), "file is not valid UTF-8")
        );
        let missing = SourceText::read(&dir.path().join("none.toml")).unwrap_err();
        assert!(
            missing.message.starts_with("cannot read: "),
            "{}",
            missing.message
        );
    }
}
