//! Paths written in configuration and policy files: relative ones are taken
//! relative to the directory of the file that wrote them, never to the
//! daemon's working directory, so a policy means the same wherever custos runs.

use std::path::{Component, Path, PathBuf};

/// Longest path we accept (Linux PATH_MAX).
const MAX_PATH: usize = 4096;

/// The directory relative paths in `file` are resolved against: the file's
/// parent, with symlinks resolved so that leading `..` components can be
/// applied lexically without changing their meaning.
pub(crate) fn base_dir_of(file: &Path) -> PathBuf {
    let parent = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    parent
        .canonicalize()
        .or_else(|_| std::path::absolute(&parent))
        .unwrap_or(parent)
}

/// Checks a path as written: not empty, no NUL byte, not absurdly long.
pub(crate) fn check_path_text(text: &str) -> Result<(), String> {
    if text.is_empty() {
        return Err("expected a path, found an empty string".into());
    }
    if text.contains('\0') {
        return Err("a path cannot contain a NUL byte".into());
    }
    if text.len() > MAX_PATH {
        return Err(format!("path is longer than {MAX_PATH} bytes"));
    }
    Ok(())
}

/// Resolves `written` against `base` (an absolute, symlink-free directory).
///
/// Leading `.` and `..` components are applied to `base`, which is safe because
/// `base` has no symlinks; `..` after a named component is kept as written,
/// since a lexical fold there could change which directory is meant.
pub(crate) fn resolve(base: &Path, written: &str) -> PathBuf {
    let path = Path::new(written);
    if path.is_absolute() {
        return path.components().collect();
    }
    let mut out = base.to_path_buf();
    let mut components = path.components().peekable();
    while let Some(c) = components.peek() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            _ => break,
        }
        components.next();
    }
    for c in components {
        out.push(c.as_os_str());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_relative_to_the_base() {
        let base = Path::new("/repo/policies");
        assert_eq!(resolve(base, "."), Path::new("/repo/policies"));
        assert_eq!(resolve(base, "../docs"), Path::new("/repo/docs"));
        assert_eq!(resolve(base, "./a/./b/"), Path::new("/repo/policies/a/b"));
        assert_eq!(resolve(base, "../../.."), Path::new("/"));
        assert_eq!(resolve(base, "a/../b"), Path::new("/repo/policies/a/../b"));
        assert_eq!(resolve(base, "/srv//x/./y/"), Path::new("/srv/x/y"));
    }

    #[test]
    fn base_dir_is_absolute_and_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().canonicalize().unwrap();
        std::fs::create_dir(real.join("conf")).unwrap();
        std::os::unix::fs::symlink(real.join("conf"), real.join("link")).unwrap();
        assert_eq!(
            base_dir_of(&real.join("link/custos.toml")),
            real.join("conf")
        );
        assert!(base_dir_of(Path::new("custos.toml")).is_absolute());
    }

    #[test]
    fn checks_path_text() {
        assert!(check_path_text("").is_err());
        assert!(check_path_text("a\0b").unwrap_err().contains("NUL"));
        assert!(check_path_text(&"a".repeat(5000)).is_err());
        assert!(check_path_text("/srv/x").is_ok());
    }
}
