#![no_main]
//! Fuzzes custos::fuzzing::descriptor (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::descriptor(data));
