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
use std::time::Duration;

use anyhow::{bail, Result};
use cellar_vfs::{StoreTimeouts, VolumeConfig};
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
    #[command(flatten)]
    pub store_timeouts: StoreTimeoutArgs,
    #[command(flatten)]
    pub meta_timeouts: MetaTimeoutArgs,
}

/// Bounds of metadata transactions (docs/CONFIGURATION.md, "Metadata timeouts").
#[derive(Args, Clone, Debug)]
pub struct MetaTimeoutArgs {
    /// A metadata operation waiting for a lock that another session or process holds fails
    /// with ETIMEDOUT past this
    #[arg(long, env = "CELLAR_META_LOCK_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub meta_lock_timeout: Duration,
    /// A metadata operation that cannot reach its PostgreSQL server is retried on new
    /// connections until this long after its first try, then fails with EIO
    #[arg(long, env = "CELLAR_META_RETRY_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub meta_retry_timeout: Duration,
}

impl MetaTimeoutArgs {
    fn timeouts(&self) -> Result<cellar_sql::Timeouts> {
        if self.meta_lock_timeout.is_zero() {
            bail!("--meta-lock-timeout must be above zero");
        }
        Ok(cellar_sql::Timeouts {
            lock: self.meta_lock_timeout,
            outage: self.meta_retry_timeout,
        })
    }

    /// Sets them for this process (before any database is opened).
    fn apply(&self) -> Result<()> {
        cellar_sql::set_timeouts(self.timeouts()?);
        Ok(())
    }
}

/// Bounds of object-store requests (docs/CONFIGURATION.md, "Object store timeouts").
#[derive(Args, Clone, Debug)]
pub struct StoreTimeoutArgs {
    /// Opening a connection to the object store
    #[arg(long, env = "CELLAR_STORE_CONNECT_TIMEOUT", value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub store_connect_timeout: Duration,
    /// One try of one object-store request, from sending it to the last byte of the answer
    #[arg(long, env = "CELLAR_STORE_REQUEST_TIMEOUT", value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub store_request_timeout: Duration,
    /// Retries of a failed request stop this long after its first try
    #[arg(long, env = "CELLAR_STORE_RETRY_TIMEOUT", value_name = "DURATION", default_value = "20s", value_parser = humantime::parse_duration)]
    pub store_retry_timeout: Duration,
    /// Hard bound of one object-store operation (a block's upload or a read, retries
    /// included): past it the operation fails, and fsync or read answers EIO
    #[arg(long, env = "CELLAR_STORE_OPERATION_TIMEOUT", value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub store_operation_timeout: Duration,
}

impl StoreTimeoutArgs {
    fn timeouts(&self) -> Result<StoreTimeouts> {
        let timeouts = StoreTimeouts {
            connect: self.store_connect_timeout,
            request: self.store_request_timeout,
            retry: self.store_retry_timeout,
            operation: self.store_operation_timeout,
        };
        if [timeouts.connect, timeouts.request, timeouts.operation].contains(&Duration::ZERO) {
            bail!("the store's connect, request and operation timeouts must be above zero");
        }
        Ok(timeouts)
    }
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
        self.meta_timeouts.apply()?;
        Ok(VolumeConfig {
            meta_url: self.meta_url.clone(),
            store_url: self.store_url.clone(),
            volume: self.volume.clone(),
            cache_mem_bytes,
            cache_dir,
            cache_disk_bytes,
            mount_point,
            store_timeouts: self.store_timeouts.timeouts()?,
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        timeouts: StoreTimeoutArgs,
        #[command(flatten)]
        meta: MetaTimeoutArgs,
    }

    #[test]
    fn store_timeout_flags_default_to_the_store_defaults() {
        let parsed = Command::parse_from(["cellar"]);
        assert_eq!(
            parsed.timeouts.timeouts().unwrap(),
            StoreTimeouts::default()
        );
        let zero = Command::parse_from(["cellar", "--store-operation-timeout", "0s"]);
        assert!(zero.timeouts.timeouts().is_err());
    }

    #[test]
    fn meta_timeout_flags_default_to_the_sql_defaults() {
        let parsed = Command::parse_from(["cellar"]);
        assert_eq!(
            parsed.meta.timeouts().unwrap(),
            cellar_sql::Timeouts::DEFAULT
        );
        let zero = Command::parse_from(["cellar", "--meta-lock-timeout", "0s"]);
        assert!(zero.meta.timeouts().is_err());
    }
}
