#![no_main]
//! Fuzzes custos::fuzzing::envelope (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::envelope(data));
