#![no_main]
//! Fuzzes custos::fuzzing::pack (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::pack(data));
