//! Local key provider: per-tenant key files holding versioned key material.

/// Local key names: `[a-z0-9][a-z0-9._-]{0,127}`, safe as a file name.
pub fn valid_key_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c))
}
