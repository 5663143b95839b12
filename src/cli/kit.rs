//! The operator's kit, generated from the same clap definitions as the
//! parser: shell completions (`custos completions bash|zsh|fish`) and man
//! pages (`custos man --out DIR`, hidden: packaging runs it).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::CommandFactory;

use super::Cli;

#[derive(clap::Args)]
pub struct CompletionsArgs {
    /// The shell to write a completion script for.
    #[arg(value_enum)]
    pub shell: Shell,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args)]
pub struct ManArgs {
    /// Directory to write `custos.1` and one page per subcommand (`custos-backup.1`, …) into.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Print the completion script for `args.shell` on stdout.
pub fn completions(args: CompletionsArgs) -> ExitCode {
    let shell = match args.shell {
        Shell::Bash => clap_complete::Shell::Bash,
        Shell::Zsh => clap_complete::Shell::Zsh,
        Shell::Fish => clap_complete::Shell::Fish,
    };
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "custos", &mut script);
    print!("{}", String::from_utf8_lossy(&script));
    ExitCode::SUCCESS
}

/// Write the man pages into `args.out` (created if missing).
pub fn man(args: ManArgs) -> ExitCode {
    let written = std::fs::create_dir_all(&args.out)
        .and_then(|()| clap_mangen::generate_to(Cli::command(), &args.out));
    match written {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "error: cannot write man pages to {}: {e}",
                args.out.display()
            );
            ExitCode::FAILURE
        }
    }
}
