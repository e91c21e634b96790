//! `cellar admin`: organizations and API keys, written straight into the server's data directory.

use std::path::PathBuf;

use anyhow::Result;
use cellar_server::{ConfigOverrides, ServerConfig};
use clap::{Args, Subcommand};

/// Manage organizations and API keys (works on the data directory; the server may be running).
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// TOML configuration file [env: CELLAR_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory [env: CELLAR_DATA_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: AdminCommand,
}

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Organizations
    #[command(subcommand)]
    Org(OrgCommand),
    /// API keys
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Subcommand, Debug)]
pub enum OrgCommand {
    /// Create an organization
    Create { name: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create an API key for an organization and print it (shown only this once)
    Create {
        #[arg(long, value_name = "NAME")]
        org: String,
    },
}

pub fn run(args: AdminArgs) -> Result<()> {
    let config = ServerConfig::resolve(ConfigOverrides {
        config_file: args.config,
        data_dir: args.data_dir,
        ..ConfigOverrides::default()
    })?;
    match args.command {
        AdminCommand::Org(OrgCommand::Create { name }) => {
            let id = cellar_server::admin_create_org(&config.data_dir, &name)?;
            println!("created organization {name} ({id})");
        }
        AdminCommand::Key(KeyCommand::Create { org }) => {
            let key = cellar_server::admin_create_key(&config.data_dir, &org)?;
            println!("{key}");
        }
    }
    Ok(())
}
