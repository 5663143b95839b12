//! The integration tests, as one binary: custos and the AWS SDK are linked
//! once instead of once per file. One module per area; run one area with
//! `cargo test --test it <module>::` (e.g. `cargo test --test it crash_loop::`).
//!
//! Every test shares this process: a test passes environment variables to the
//! custos child it runs (`common::Cli::run_env`) and never sets them, or the
//! working directory, for the process.

mod common;

mod audit_log;
mod backends;
mod bad_input;
mod cli_errors;
mod cli_kms;
mod cli_pkcs11;
mod compliance_report;
mod crash_loop;
mod daemon;
mod drill;
mod faults;
mod format_vectors;
mod fuzz_corpus;
mod independent_restore;
mod key_providers;
mod kms_faults;
mod object_store_source;
mod ownership;
mod policies;
mod probe;
mod readers;
mod residency;
mod restore_requests;
mod restore_target;
mod rotate;
mod roundtrip;
mod secrets;
mod shred;
mod shred_kms;
mod shred_records;
mod store_conformance;
mod systemd;
mod tamper;
