//! `cellar gc`: compacts fragmented files and deletes garbage objects of a volume.

use std::time::Duration;

use anyhow::Result;
use clap::Args;

use super::VolumeArgs;

/// Compact fragmented chunks and delete unreferenced objects older than the grace period.
#[derive(Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Only delete garbage older than this (uploads in flight on live mounts are younger)
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub grace: Duration,
    /// Also delete leaked objects (in the store but referenced by no metadata)
    #[arg(long)]
    pub delete_leaked: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: GcArgs) -> Result<()> {
    let config = args.volume.maintenance_config()?;
    let spinner = super::spinner(format!("collecting garbage of volume {}", config.volume));
    let (deleted_objects, compacted_chunks) =
        cellar_vfs::maintenance::gc(&config, args.grace, args.delete_leaked)?;
    spinner.finish_and_clear();
    if args.json {
        let report = serde_json::json!({
            "volume": config.volume,
            "deleted_objects": deleted_objects,
            "compacted_chunks": compacted_chunks,
        });
        println!("{report}");
    } else {
        println!(
            "volume {}: deleted {deleted_objects} object(s), compacted {compacted_chunks} chunk(s)",
            config.volume
        );
    }
    Ok(())
}
