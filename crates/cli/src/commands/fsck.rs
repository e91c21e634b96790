//! `cellar fsck`: checks a volume's metadata and its objects.

use anyhow::{bail, Result};
use clap::Args;

use super::VolumeArgs;

/// Check a volume (metadata invariants, missing and leaked objects); exit 1 if problems remain.
#[derive(Args, Debug)]
pub struct FsckArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Fix what can be fixed (refused while a mount of the volume is live, unless --force)
    #[arg(long)]
    pub repair: bool,
    /// Repair even while other mounts of the volume are live (they may be writing)
    #[arg(long, requires = "repair")]
    pub force: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: FsckArgs) -> Result<()> {
    let config = args.volume.maintenance_config()?;
    let spinner = super::spinner(format!("checking volume {}", config.volume));
    let found = cellar_vfs::maintenance::fsck(&config, args.repair, args.force)?;
    // After a repair, a second pass tells what is left.
    let remaining = if args.repair && !found.is_empty() {
        spinner.set_message(format!("re-checking volume {}", config.volume));
        cellar_vfs::maintenance::fsck(&config, false, false)?
    } else {
        found.clone()
    };
    spinner.finish_and_clear();

    if args.json {
        let report = serde_json::json!({
            "volume": config.volume,
            "problems": found,
            "repaired": args.repair,
            "remaining": remaining,
        });
        println!("{report}");
    } else {
        for problem in &found {
            println!("{problem}");
        }
        if found.is_empty() {
            println!("volume {}: no problems found", config.volume);
        } else if args.repair {
            println!(
                "volume {}: {} problem(s) found, {} remain after repair",
                config.volume,
                found.len(),
                remaining.len()
            );
        } else {
            println!(
                "volume {}: {} problem(s) found (run with --repair to fix them)",
                config.volume,
                found.len()
            );
        }
    }
    if !remaining.is_empty() {
        bail!(
            "volume {} has {} problem(s)",
            config.volume,
            remaining.len()
        );
    }
    Ok(())
}
