//! `cellar admin`: organizations, API keys and runner tokens, written straight into the server's
//! data directory.

use std::path::PathBuf;

use anyhow::Result;
use cellar_server::{ConfigOverrides, ServerConfig};
use clap::{Args, Subcommand};

/// Manage organizations, API keys and runner tokens (works on the data directory; the server may
/// be running).
#[derive(Args, Debug)]
pub struct AdminArgs {
    /// TOML configuration file [env: CELLAR_CONFIG]
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory [env: CELLAR_DATA_DIR]
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// The server's PostgreSQL database, if it runs on one (prefer CELLAR_DATABASE) [env:
    /// CELLAR_DATABASE]
    #[arg(long, global = true, value_name = "URL")]
    pub database: Option<String>,
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
    /// Runners (the embedded one is `local`)
    #[command(subcommand)]
    Runner(RunnerCommand),
    /// Tokens `cellar runner` joins the server with
    #[command(subcommand)]
    RunnerToken(RunnerTokenCommand),
}

#[derive(Subcommand, Debug)]
pub enum RunnerCommand {
    /// List the runners the server knows: state, capacity, sandboxes running, last heartbeat
    List,
}

#[derive(Subcommand, Debug)]
pub enum RunnerTokenCommand {
    /// Mint a runner token and print it (shown only this once; only its hash is stored)
    Create {
        /// A label to tell tokens apart
        #[arg(long, value_name = "NAME", default_value = "runner")]
        name: String,
    },
    /// List runner tokens (never the tokens themselves)
    List,
    /// Revoke a token by id, or every token with that name: runners using it can no longer
    /// register or heartbeat
    Revoke {
        #[arg(value_name = "ID|NAME")]
        token: String,
    },
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
        database: args.database,
        ..ConfigOverrides::default()
    })?;
    match args.command {
        AdminCommand::Org(OrgCommand::Create { name }) => {
            let id = cellar_server::admin_create_org(&config, &name)?;
            println!("created organization {name} ({id})");
        }
        AdminCommand::Key(KeyCommand::Create { org }) => {
            let key = cellar_server::admin_create_key(&config, &org)?;
            println!("{key}");
        }
        AdminCommand::RunnerToken(RunnerTokenCommand::Create { name }) => {
            let (id, token) = cellar_server::admin_create_runner_token(&config, &name)?;
            eprintln!("created runner token {name} ({id}); it is shown only this once:");
            println!("{token}");
        }
        AdminCommand::Runner(RunnerCommand::List) => {
            println!(
                "{:<20}  {:<5}  {:>8}  {:>7}  {:<24}  URL",
                "NAME", "STATE", "CAPACITY", "RUNNING", "LAST HEARTBEAT"
            );
            for runner in cellar_server::admin_list_runners(&config)? {
                let heartbeat = std::time::UNIX_EPOCH
                    + std::time::Duration::from_millis(runner.last_heartbeat_ms.max(0) as u64);
                println!(
                    "{:<20}  {:<5}  {:>8}  {:>7}  {:<24}  {}",
                    runner.id,
                    runner.state,
                    runner.capacity,
                    runner.running,
                    humantime::format_rfc3339_millis(heartbeat).to_string(),
                    if runner.url.is_empty() {
                        "(embedded)"
                    } else {
                        &runner.url
                    }
                );
            }
        }
        AdminCommand::RunnerToken(RunnerTokenCommand::List) => {
            println!("{:<36}  {:<20}  {:<24}  REVOKED", "ID", "NAME", "CREATED");
            for token in cellar_server::admin_list_runner_tokens(&config)? {
                println!(
                    "{:<36}  {:<20}  {:<24}  {}",
                    token.id,
                    token.name,
                    token.created_at,
                    token.revoked_at.as_deref().unwrap_or("-")
                );
            }
        }
        AdminCommand::RunnerToken(RunnerTokenCommand::Revoke { token }) => {
            let revoked = cellar_server::admin_revoke_runner_token(&config, &token)?;
            println!("revoked {revoked} runner token(s)");
        }
    }
    Ok(())
}
