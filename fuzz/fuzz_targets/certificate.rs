#![no_main]
//! Fuzzes custos::fuzzing::certificate (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::certificate(data));
