#![no_main]
//! Fuzzes custos::fuzzing::index (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::index(data));
