#![no_main]
//! Fuzzes custos::fuzzing::snapshot (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::snapshot(data));
