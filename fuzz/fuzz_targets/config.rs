#![no_main]
//! Fuzzes custos::fuzzing::config (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::config(data));
