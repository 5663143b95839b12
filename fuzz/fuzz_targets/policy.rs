#![no_main]
//! Fuzzes custos::fuzzing::policy (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::policy(data));
