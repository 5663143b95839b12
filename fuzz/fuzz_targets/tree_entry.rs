#![no_main]
//! Fuzzes custos::fuzzing::tree_entry (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::tree_entry(data));
