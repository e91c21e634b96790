//! One module per `cellar` subcommand, plus the arguments they share.

pub mod admin;
mod api_client;
pub mod fsck;
pub mod gc;
pub mod mount;
pub mod runner;
pub mod sandbox;
pub mod server;
pub mod umount;
pub mod volume;

use std::path::PathBuf;

use anyhow::{bail, Result};
use cellar_vfs::VolumeConfig;
use clap::Args;
use indicatif::ProgressBar;

/// Which volume: its metadata engine, its object store and its name.
#[derive(Args, Clone, Debug)]
pub struct VolumeArgs {
    /// Metadata engine URL, e.g. sqlite:///var/lib/cellar/data.db
    #[arg(long = "meta", env = "CELLAR_META_URL", value_name = "URL")]
    pub meta_url: String,
    /// Object store URL: file:///dir or s3://bucket/prefix?endpoint=http://host:port&region=...
    /// (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    #[arg(long = "store", env = "CELLAR_STORE_URL", value_name = "URL")]
    pub store_url: String,
    /// Volume name (formatted on first use)
    #[arg(long, env = "CELLAR_VOLUME", value_name = "NAME")]
    pub volume: String,
}

impl VolumeArgs {
    /// Checks the URLs parse (without echoing them: they may hold passwords) and builds the
    /// volume configuration with the given caches.
    pub fn config(
        &self,
        mount_point: String,
        cache_mem_bytes: u64,
        cache_dir: Option<PathBuf>,
        cache_disk_bytes: u64,
    ) -> Result<VolumeConfig> {
        for (flag, value) in [("--meta", &self.meta_url), ("--store", &self.store_url)] {
            if let Err(e) = url::Url::parse(value) {
                bail!("invalid {flag} URL: {e}");
            }
        }
        if self.volume.is_empty() {
            bail!("--volume must not be empty");
        }
        Ok(VolumeConfig {
            meta_url: self.meta_url.clone(),
            store_url: self.store_url.clone(),
            volume: self.volume.clone(),
            cache_mem_bytes,
            cache_dir,
            cache_disk_bytes,
            mount_point,
        })
    }

    /// The configuration for offline maintenance (no mount point, a small cache).
    pub fn maintenance_config(&self) -> Result<VolumeConfig> {
        self.config(String::new(), 64 << 20, None, 0)
    }
}

/// A spinner on stderr for operations that may take long (hidden when stderr is no terminal).
pub fn spinner(message: String) -> ProgressBar {
    let spinner = ProgressBar::new_spinner();
    spinner.set_message(message);
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    spinner
}
