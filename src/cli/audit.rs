//! `custos audit …`: verify the audit log, show its records, print the public key.
//!
//! - `custos audit verify [--from-store] [--offline] [--witness FILE]…
//!   [--public-key FILE] [--json]` checks chain, tree and signatures, holds
//!   each copy to what the other copy, the state and witnesses know of the
//!   log (a cut is named), and exits 1 on any fault;
//! - `custos audit checkpoint` prints the latest signed checkpoint, for an
//!   operator to keep where custos cannot write (a witness);
//! - `custos audit show [--tenant T] [--since 24h|RFC3339] [--json]` lists
//!   records (`--json` prints the stored lines unchanged);
//! - `custos audit public-key` prints the verifier key
//!   (`<name>+<key id>+<base64 key>`), creating the audit key on first use.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use chrono::{DateTime, Utc};

use futures::StreamExt;

use super::output;
use crate::audit::log::{LOG_FILE, LineReader};
use crate::audit::{AuditKey, AuditRecord, VerifierKey, VerifyReport, Witness, audit_dir, verify};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::store::SharedStore;
use crate::tenant::TenantId;

#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum AuditCommand {
    /// Verify the audit log's hash chain, Merkle tree and checkpoint signatures.
    Verify {
        /// Verify the copy replicated to the store instead of the local log.
        #[arg(long)]
        from_store: bool,
        /// Verifier key file (`custos audit public-key` output); default: this installation's key.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Do not read the store copy to cross-check the local log (the report says so).
        #[arg(long, conflicts_with = "from_store")]
        offline: bool,
        /// A checkpoint kept elsewhere (`custos audit checkpoint` output): the log must still hold it.
        #[arg(long, value_name = "FILE")]
        witness: Vec<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the latest signed checkpoint, to keep where custos cannot write it.
    Checkpoint,
    /// Show audit records.
    Show {
        /// Only records of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only records at or after this time: RFC 3339, or a duration ago such as 24h.
        #[arg(long)]
        since: Option<String>,
        /// Print the stored JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Print the audit verifier key (created on first use).
    PublicKey,
}

impl AuditCommand {
    /// Whether the command prints JSON (its failures then print the envelope).
    pub fn json(&self) -> bool {
        match self {
            AuditCommand::Verify { json, .. } | AuditCommand::Show { json, .. } => *json,
            AuditCommand::Checkpoint | AuditCommand::PublicKey => false,
        }
    }
}

/// Runs an audit command; an error is printed by the caller (`--json`: the
/// envelope), as for every command.
pub async fn run(cmd: AuditCommand, cfg: &Config, store: SharedStore) -> Result<ExitCode> {
    match cmd {
        AuditCommand::Verify {
            from_store,
            public_key,
            offline,
            witness,
            json,
        } => {
            let opts = VerifyOptions {
                from_store,
                offline,
                public_key,
                witnesses: witness,
            };
            Ok(verify_cmd(cfg, store, &opts, json).await)
        }
        AuditCommand::Checkpoint => {
            let dir = audit_dir(&cfg.state_dir);
            let key_file = cfg.audit.key_file.clone();
            let text = blocking(move || latest_checkpoint(&dir, &key_file)).await?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Show {
            tenant,
            since,
            json,
        } => {
            let tenant = tenant.map(|t| TenantId::new(&t)).transpose()?;
            let since = since.map(|s| parse_since(&s, Utc::now())).transpose()?;
            let dir = audit_dir(&cfg.state_dir);
            blocking(move || show(&dir, tenant.as_ref(), since, json)).await?;
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::PublicKey => {
            let path = cfg.audit.key_file.clone();
            let key = blocking(move || AuditKey::load_or_create(&path)).await?;
            println!("{}", key.public_key_text());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// File work off the async runtime; a worker that panicked is a bug.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("audit worker failed: {e}")))?
}

/// `--since`: an RFC 3339 time, or a duration (`24h`, `7d`, `90min`) before `now`.
pub fn parse_since(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    // The shared parser caps durations (1000 years), like every duration custos takes.
    let d = crate::config::units::parse_duration(s).map_err(|e| {
        Error::InvalidArgument(format!(
            "--since {s:?}: expected an RFC 3339 time or a duration such as 24h ({e})"
        ))
    })?;
    let too_long = || Error::InvalidArgument(format!("--since {s:?}: duration too long"));
    let d = chrono::Duration::from_std(d).map_err(|_| too_long())?;
    now.checked_sub_signed(d).ok_or_else(too_long)
}

struct VerifyOptions {
    from_store: bool,
    offline: bool,
    public_key: Option<PathBuf>,
    witnesses: Vec<PathBuf>,
}

/// `audit verify`: exit 0 when the log verifies, 1 on a fault or an error.
/// `--json` prints the one envelope: `{"ok": true, "result": report}`, or
/// `{"ok": false, "error": {kind, message}}` with `result` when a report
/// was made (a failed verification).
async fn verify_cmd(
    cfg: &Config,
    store: SharedStore,
    opts: &VerifyOptions,
    json: bool,
) -> ExitCode {
    let dir = audit_dir(&cfg.state_dir);
    let source = if opts.from_store {
        "store audit/".to_owned()
    } else {
        dir.display().to_string()
    };
    let report = match verify_report(cfg, store, opts, &dir).await {
        Ok(r) => r,
        Err(e) => return output::fail(json, &e),
    };
    let Some(report) = report else {
        if json {
            output::print_envelope(
                true,
                Some(&serde_json::json!({
                    "source": source, "records": 0, "faults": [], "cross_checks": [],
                })),
                None,
            );
        } else {
            println!("audit log {source}: empty (no audit key created yet)");
        }
        return ExitCode::SUCCESS;
    };
    let failure = (!report.ok()).then(|| Error::AuditVerification {
        source_name: source.clone(),
        message: report.summary(),
    });
    if json {
        let mut result = serde_json::to_value(&report).unwrap_or_default();
        result["source"] = source.clone().into();
        output::print_envelope(
            failure.is_none(),
            Some(&result),
            failure.as_ref().map(Into::into),
        );
    } else {
        print!("{}", human_report(&source, &report));
    }
    match failure {
        None => ExitCode::SUCCESS,
        Some(_) => ExitCode::from(1),
    }
}

/// The verification report; `None` for a fresh installation (no audit key,
/// no log, and nothing in the store that says there was one).
async fn verify_report(
    cfg: &Config,
    store: SharedStore,
    opts: &VerifyOptions,
    dir: &Path,
) -> crate::Result<Option<VerifyReport>> {
    let verifier = match &opts.public_key {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            VerifierKey::parse(&text).map_err(|e| {
                Error::InvalidArgument(format!("verifier key {}: {e}", path.display()))
            })?
        }
        None => match AuditKey::load(&cfg.audit.key_file) {
            Ok(key) => key.verifier().clone(),
            Err(Error::NotFound { .. }) if !opts.from_store && !dir.join(LOG_FILE).exists() => {
                // Nothing logged nor signed here yet, unless the store copy
                // says otherwise: then the log and its key were removed.
                if !opts.offline {
                    let listed = store
                        .list(Some(&object_store::path::Path::from("audit/checkpoints")))
                        .next()
                        .await
                        .transpose()
                        .map_err(|e| Error::store("list", "audit/checkpoints", e))?;
                    if let Some(found) = listed {
                        return Err(Error::AuditVerification {
                            source_name: dir.display().to_string(),
                            message: format!(
                                "there is no local log nor audit key, but the store copy holds one ({}): the local log was removed; verify the store copy with `custos audit verify --from-store --public-key FILE` and a verifier key kept elsewhere",
                                found.location
                            ),
                        });
                    }
                }
                return Ok(None);
            }
            Err(e) => {
                return Err(Error::Config {
                    path: cfg.audit.key_file.clone(),
                    message: format!(
                        "cannot load this installation's audit key ({e}); pass --public-key FILE"
                    ),
                });
            }
        },
    };
    let mut witnesses = Vec::new();
    for path in &opts.witnesses {
        let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        witnesses.push(Witness {
            label: path.display().to_string(),
            text,
        });
    }
    let report = if opts.from_store {
        verify::verify_store_copy(&store, dir, &verifier, &witnesses).await?
    } else {
        let replica = (!opts.offline).then_some(&store);
        verify::verify_local_copy(dir, &verifier, replica, &witnesses).await?
    };
    Ok(Some(report))
}

/// The latest signed checkpoint of the installation's log, checked against
/// its key.
fn latest_checkpoint(dir: &Path, key_file: &Path) -> Result<String> {
    // The key's errors name its file.
    let key = AuditKey::load(key_file)?;
    let log = crate::audit::AuditLog::open(dir, key, None)?;
    match log.latest_checkpoint()? {
        Some(cp) => Ok(cp.text().to_owned()),
        None => Err(Error::NotFound {
            what: "a checkpoint to keep (the audit log is empty)".into(),
        }),
    }
}

/// Faults printed in the human report before the rest are counted.
const MAX_PRINTED_FAULTS: usize = 50;

pub fn human_report(source: &str, report: &VerifyReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "audit log:   {source}");
    let _ = writeln!(out, "verifier:    {}", report.verifier);
    let _ = writeln!(
        out,
        "records:     {}   checkpoints checked: {}   latest signed size: {}",
        report.records,
        report.checkpoints_checked,
        report
            .latest_checkpoint
            .map_or_else(|| "none".to_owned(), |s| s.to_string())
    );
    if let Some(seq) = report.interrupted_append {
        let _ = writeln!(
            out,
            "note:        record {seq} is custos' own append, interrupted before its checkpoint (signed intent in `pending`); the next custos command signs it"
        );
    }
    for c in &report.cross_checks {
        let outcome = serde_json::to_value(c.outcome)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(out, "cross-check: [{outcome}] {}", c.message);
    }
    if report.ok() {
        let _ = writeln!(
            out,
            "OK: chain, tree and signatures verify, and no copy was cut"
        );
        return out;
    }
    for f in report.faults.iter().take(MAX_PRINTED_FAULTS) {
        let what = match (f.seq, f.checkpoint) {
            (Some(s), _) => format!("record {s}"),
            (None, Some(c)) => format!("checkpoint {c}"),
            (None, None) => "log".to_owned(),
        };
        let kind = serde_json::to_value(f.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = writeln!(out, "FAULT {what} [{kind}]: {}", f.message);
    }
    if report.faults.len() > MAX_PRINTED_FAULTS {
        let _ = writeln!(
            out,
            "… and {} more faults (use --json for all)",
            report.faults.len() - MAX_PRINTED_FAULTS
        );
    }
    let _ = writeln!(out, "FAILED: {} fault(s)", report.faults.len());
    out
}

fn show(
    dir: &Path,
    tenant: Option<&TenantId>,
    since: Option<DateTime<Utc>>,
    json: bool,
) -> Result<()> {
    use std::io::Write;
    let path = dir.join(LOG_FILE);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("no audit records yet ({} does not exist)", path.display());
            return Ok(());
        }
        Err(e) => return Err(Error::io(&path, e)),
    };
    let mut reader = LineReader::open(&path, 0, len).map_err(|e| Error::io(&path, e))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Stdout failing (a closed pipe) ends the command as every command's output does.
    let written = |r: std::io::Result<()>| r.unwrap_or_else(|e| super::stdout_failed(e));
    if !json {
        written(writeln!(
            out,
            "{:>6}  {:<27}  {:<18}  {:<16}  {:<16}  DETAILS",
            "SEQ", "TIME", "EVENT", "TENANT", "ACTOR"
        ));
    }
    let mut line = Vec::new();
    let mut number = 0u64;
    while let Some(terminated) = reader
        .next_line(&mut line)
        .map_err(|e| Error::io(&path, e))?
    {
        number += 1;
        if !terminated {
            break; // an append in progress
        }
        let rec = match AuditRecord::from_line(&line) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("line {number}: {e} (run `custos audit verify`)");
                continue;
            }
        };
        if tenant.is_some_and(|t| rec.tenant.as_ref() != Some(t))
            || since.is_some_and(|s| rec.time < s)
        {
            continue;
        }
        if json {
            written(out.write_all(&line));
            written(out.write_all(b"\n"));
        } else {
            written(writeln!(
                out,
                "{:>6}  {:<27}  {:<18}  {:<16}  {:<16}  {}",
                rec.seq,
                rec.time
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                rec.event,
                rec.tenant.as_ref().map_or("-", |t| t.as_str()),
                rec.actor,
                rec.details
            ));
        }
    }
    written(out.flush());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_times_and_durations() {
        let now = DateTime::parse_from_rfc3339("2025-06-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_since("24h", now).unwrap(),
            DateTime::parse_from_rfc3339("2025-05-31T12:00:00Z").unwrap()
        );
        assert_eq!(
            parse_since("2025-01-01T00:00:00+01:00", now).unwrap(),
            DateTime::parse_from_rfc3339("2024-12-31T23:00:00Z").unwrap()
        );
        assert!(parse_since("yesterday", now).is_err());
    }

    #[test]
    fn parses_as_a_subcommand() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: AuditCommand,
        }
        let c =
            Cli::try_parse_from(["x", "verify", "--from-store", "--public-key", "k.pub"]).unwrap();
        assert_eq!(
            c.cmd,
            AuditCommand::Verify {
                from_store: true,
                public_key: Some(PathBuf::from("k.pub")),
                offline: false,
                witness: vec![],
                json: false
            }
        );
        let c = Cli::try_parse_from(["x", "verify", "--witness", "a", "--witness", "b"]).unwrap();
        assert!(
            matches!(&c.cmd, AuditCommand::Verify { witness, .. } if witness.len() == 2),
            "{:?}",
            c.cmd
        );
        assert!(Cli::try_parse_from(["x", "verify", "--from-store", "--offline"]).is_err());
        assert_eq!(
            Cli::try_parse_from(["x", "checkpoint"]).unwrap().cmd,
            AuditCommand::Checkpoint
        );
        let c = Cli::try_parse_from(["x", "show", "--tenant", "acme", "--since", "24h", "--json"])
            .unwrap();
        assert!(matches!(c.cmd, AuditCommand::Show { json: true, .. }));
        assert_eq!(
            Cli::try_parse_from(["x", "public-key"]).unwrap().cmd,
            AuditCommand::PublicKey
        );
    }
}
