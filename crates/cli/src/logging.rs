//! Log output: `tracing` events to stderr (a background mount points stderr at its log file).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

const CELLAR_CRATES: [&str; 7] = [
    "cellar_cli",
    "cellar_fuse",
    "cellar_vfs",
    "cellar_meta",
    "cellar_store",
    "cellar_server",
    "cellar_runner",
];

/// fuser warns that its own clean-up unmount failed whenever the file system was unmounted from
/// outside (`umount`, `cellar umount`), which is the normal way to end a mount.
const QUIETED: &str = "fuser::mnt=error";

/// `RUST_LOG` wins; otherwise Cellar's own crates log at info (debug with -v) and everything
/// else at warn (-vv: trace everywhere).
pub fn init(verbose: u8, colours: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let (own, others) = match verbose {
            0 => ("info", "warn"),
            1 => ("debug", "info"),
            _ => ("trace", "trace"),
        };
        let directives: Vec<String> = [others, QUIETED]
            .into_iter()
            .map(str::to_owned)
            .chain(CELLAR_CRATES.iter().map(|krate| format!("{krate}={own}")))
            .collect();
        EnvFilter::new(directives.join(","))
    });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(colours && std::io::stderr().is_terminal())
        .init();
}
