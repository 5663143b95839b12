//! HKDF derivations (being written)
