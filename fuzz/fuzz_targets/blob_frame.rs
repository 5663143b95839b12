#![no_main]
//! Fuzzes custos::fuzzing::blob_frame (see src/fuzzing.rs).
libfuzzer_sys::fuzz_target!(|data: &[u8]| custos::fuzzing::blob_frame(data));
