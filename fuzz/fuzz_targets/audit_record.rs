#![no_main]
//! Fuzzes custos::fuzzing::audit_record (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::audit_record(data));
