#![no_main]
//! Fuzzes custos::fuzzing::checkpoint (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::checkpoint(data));
