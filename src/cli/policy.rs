//! `custos policy validate [DIR]`: reports every error with file and line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::output::print_envelope;
use crate::config::{Config, validate_dir_under};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Validate every policy in DIR (default: the configured policies directory).
    Validate {
        dir: Option<PathBuf>,
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: Option<&Path>, cmd: PolicyCommand) -> ExitCode {
    let PolicyCommand::Validate { dir, json } = cmd;
    // The configuration's [residency] applies to any directory validated.
    let config = match Config::discover(config) {
        Ok(c) => {
            super::setup::print_warnings(&c);
            c
        }
        Err(e) => return super::output::fail(json, &e.into()),
    };
    let dir = dir.unwrap_or_else(|| config.policies_dir.clone());
    let report = validate_dir_under(&dir, &config.residency_rules());
    if json {
        print_envelope(report.is_ok(), Some(&report), None);
    } else {
        println!("{report}");
    }
    if report.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
