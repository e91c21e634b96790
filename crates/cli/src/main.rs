//! `cellar`: mount, maintain and serve Cellar volumes.
//!
//! Exit codes: 0 success, 1 error (one line on stderr), 2 usage error.

mod commands;
mod logging;

use std::process::ExitCode;

use clap::{ArgAction, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cellar",
    version,
    about = "Persistent POSIX volumes on object storage for code sandboxes"
)]
struct Cli {
    /// More log output: -v debug, -vv trace (RUST_LOG overrides).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Mount(commands::mount::MountArgs),
    Umount(commands::umount::UmountArgs),
    Fsck(commands::fsck::FsckArgs),
    Gc(commands::gc::GcArgs),
    Server(commands::server::ServerArgs),
    Runner(commands::runner::RunnerArgs),
    Admin(commands::admin::AdminArgs),
    Volume(commands::volume::VolumeArgs),
    Sandbox(commands::sandbox::SandboxArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A background mount logs to its log file: no terminal colours there.
    let daemon = matches!(&cli.command, Command::Mount(args) if !args.foreground);
    logging::init(cli.verbose, !daemon);
    let result = match cli.command {
        Command::Mount(args) => commands::mount::run(args),
        Command::Umount(args) => commands::umount::run(args),
        Command::Fsck(args) => commands::fsck::run(args),
        Command::Gc(args) => commands::gc::run(args),
        Command::Server(args) => commands::server::run(args),
        Command::Runner(args) => commands::runner::run(args),
        Command::Admin(args) => commands::admin::run(args),
        Command::Volume(args) => commands::volume::run(args),
        Command::Sandbox(args) => commands::sandbox::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
