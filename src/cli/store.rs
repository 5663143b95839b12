//! `custos store probe`: does the configured store honour conditional writes?

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;

use super::output::{fail, finish, print_envelope};
use super::setup::setup;
use crate::error::Result;
use crate::store::probe::{ProbeRecord, probe_cached};

#[derive(Subcommand)]
pub enum StoreCommand {
    /// Probe (or show the cached probe of) the store's conditional writes, which
    /// leases and descriptor updates rely on. Exits 1 when the store fails it.
    Probe {
        /// Probe now, even if a result less than a day old is cached.
        #[arg(long)]
        refresh: bool,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(config: Option<&Path>, cmd: StoreCommand) -> ExitCode {
    match cmd {
        StoreCommand::Probe { refresh, json } => match probe(config, refresh).await {
            Ok(rec) if !rec.supported() => {
                let e = crate::Error::ConditionalWritesUnsupported {
                    url: rec.url.clone(),
                    message: rec.result.detail.clone().unwrap_or_default(),
                };
                if json {
                    print_envelope(false, Some(&rec), Some((&e).into()));
                } else {
                    print(&&rec);
                }
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
            Ok(rec) => finish(json, Ok(&rec), print),
            Err(e) => fail(json, &e),
        },
    }
}

fn print(r: &&ProbeRecord) {
    println!(
        "store    {}\nprobed   {}{}\ncreate   {}\nupdate   {}\nresult   {}",
        r.url,
        r.probed_at.format("%Y-%m-%d %H:%M:%S UTC"),
        if r.cached { " (cached)" } else { "" },
        if r.result.create_exclusive {
            "create-if-absent honoured"
        } else {
            "create-if-absent NOT honoured"
        },
        if r.result.update_checked {
            "update-if-match honoured"
        } else {
            "update-if-match NOT honoured"
        },
        if r.supported() {
            "conditional writes supported: leases and descriptor updates are safe".to_owned()
        } else {
            format!(
                "NOT supported: {}",
                r.result.detail.as_deref().unwrap_or("")
            )
        }
    );
}

async fn probe(config: Option<&Path>, refresh: bool) -> Result<ProbeRecord> {
    let s = setup(config).await?;
    probe_cached(&s.ctx, refresh).await
}
