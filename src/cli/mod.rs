//! The `custos` command line: one module per command. Library errors are
//! typed; here they get their context and become exit codes:
//! 0 success, 1 failure (job failed, faults found), 2 invalid usage.

// Every command prints through these: `println!` panics when stdout is a
// closed pipe (`custos certificate verify … | head -1`), and no input may
// panic. Not SIGPIPE's default action, which would also kill custos on a
// pipe to a child (a drill's verify command). Defined before the modules so
// that their `println!` and `print!` are these.
macro_rules! println {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::stdout_failed(e)
        }
    }};
}

macro_rules! print {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            $crate::cli::stdout_failed(e)
        }
    }};
}

mod audit;
mod backup;
mod certificate;
mod check;
mod daemon;
mod drill;
mod forget;
mod kit;
mod output;
mod policy;
mod report;
mod restore;
mod rotate;
mod setup;
mod shred;
mod snapshots;
mod store;
mod tenant;
mod unlock;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::report::logging::{self, LogTarget};

#[derive(Parser)]
#[command(
    name = "custos",
    version,
    about = "Per-tenant encrypted backups under customer-managed keys, with restore drills and verifiable crypto-shredding",
    long_about = None
)]
pub struct Cli {
    /// Configuration file (default: $CUSTOS_CONFIG, else ./custos.toml, else built-in defaults).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Initialise, list and inspect tenants.
    #[command(subcommand)]
    Tenant(tenant::TenantCommand),
    /// Back up a tenant's sources, as its policy defines them.
    Backup(backup::Args),
    /// List a tenant's snapshots.
    Snapshots(snapshots::Args),
    /// Restore a snapshot into a directory.
    Restore(restore::Args),
    /// Verify a tenant's repository (structure; with --read-data, every blob).
    Check(check::Args),
    /// Remove snapshots by retention rules (the policy's by default).
    Forget(forget::ForgetArgs),
    /// Remove data no snapshot needs.
    Prune(forget::PruneArgs),
    /// Tenant policy files.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// Run a restore drill (`drill <TENANT>`), or list past ones (`drill history <TENANT>`).
    Drill(drill::Args),
    /// The tamper-evident audit log: verify it, show it, print its public key.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Rotate a tenant's keys: the CMK (--cmk), a new CMK (--replace-cmk), or a new data-key epoch (--new-epoch).
    Rotate(rotate::Args),
    /// The object store: probe its conditional writes.
    #[command(subcommand)]
    Store(store::StoreCommand),
    /// Run every tenant's jobs on their schedules (under systemd); --once: what is due now.
    Daemon(daemon::Args),
    /// Crypto-shred a tenant (or one key epoch) and issue a signed deletion certificate.
    Shred(shred::Args),
    /// Deletion certificates: verify one (offline, or --online), or get a stored one.
    #[command(subcommand)]
    Certificate(certificate::CertificateCommand),
    /// Remove a tenant's stale lease and reader records (dead or expired holders; --force: all).
    Unlock(unlock::Args),
    /// The compliance report: each tenant's controls and their evidence, from the verified audit log.
    Report(report::Args),
    /// Print a shell completion script (bash, zsh or fish) on stdout.
    Completions(kit::CompletionsArgs),
    /// Write man pages (custos.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Man(kit::ManArgs),
}

/// Stdout could not be written: the job has finished (commands print their
/// result last), so exit at once. A reader that went away (a closed pipe)
/// gets the shell's status for a process SIGPIPE ended, 141, silently;
/// anything else is reported on stderr.
pub(crate) fn stdout_failed(e: std::io::Error) -> ! {
    use std::io::Write as _;
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    let _ = writeln!(
        std::io::stderr(),
        "error: cannot write to standard output: {e}"
    );
    std::process::exit(1)
}

/// Entry point of the `custos` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The long-running daemon logs to stdout (journald, log shippers); every
    // other command keeps stdout for its result and logs to stderr.
    let target = match &cli.command {
        Command::Daemon(args) if !args.once => LogTarget::Stdout,
        _ => LogTarget::Stderr,
    };
    logging::init(target);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // A backup walks its source recursively, up to `walk::MAX_DEPTH`
        // levels, on these threads; the 2 MiB default would not hold that.
        // Address space only: untouched stack pages take no memory.
        .thread_stack_size(16 << 20)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(dispatch(cli))
}

async fn dispatch(cli: Cli) -> ExitCode {
    let config = cli.config.as_deref();
    match cli.command {
        Command::Completions(args) => kit::completions(args),
        Command::Man(args) => kit::man(args),
        Command::Tenant(cmd) => tenant::run(config, cmd).await,
        Command::Backup(args) => backup::run(config, args).await,
        Command::Snapshots(args) => snapshots::run(config, args).await,
        Command::Restore(args) => restore::run(config, args).await,
        Command::Check(args) => check::run(config, args).await,
        Command::Forget(args) => forget::run_forget(config, args).await,
        Command::Prune(args) => forget::run_prune(config, args).await,
        Command::Policy(cmd) => policy::run(config, cmd).await,
        Command::Drill(args) => drill::run(config, args).await,
        Command::Audit(cmd) => run_audit(config, cmd).await,
        Command::Rotate(args) => rotate::run(config, args).await,
        Command::Store(cmd) => store::run(config, cmd).await,
        Command::Daemon(args) => daemon::run(config, args).await,
        Command::Shred(args) => shred::run(config, args).await,
        Command::Certificate(cmd) => certificate::run(config, cmd).await,
        Command::Unlock(args) => unlock::run(config, args).await,
        Command::Report(args) => report::run(config, args).await,
    }
}

async fn run_audit(config: Option<&std::path::Path>, cmd: audit::AuditCommand) -> ExitCode {
    let json = cmd.json();
    let cfg = match crate::config::Config::discover(config) {
        Ok(c) => c,
        Err(e) => return output::fail(json, &e.into()),
    };
    setup::print_warnings(&cfg);
    let store = match crate::context::open_store(&cfg) {
        Ok(s) => s,
        Err(e) => return output::fail(json, &e),
    };
    match audit::run(cmd, &cfg, store).await {
        Ok(code) => code,
        Err(e) => output::fail(json, &e),
    }
}
