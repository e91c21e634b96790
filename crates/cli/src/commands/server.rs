//! `cellar server`: the API server, with its embedded runner unless --no-embedded-runner.

pub(crate) mod preflight;

use std::path::PathBuf;

use anyhow::Result;
use cellar_server::{ConfigOverrides, Server, ServerConfig};
use clap::Args;

/// Run the API server (Daytona-compatible) with an embedded sandbox runner.
///
/// Settings: flags > CELLAR_* environment > TOML file > defaults (docs/CONFIGURATION.md).
#[derive(Args, Debug)]
pub struct ServerArgs {
    /// TOML configuration file [env: CELLAR_CONFIG]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [env: CELLAR_LISTEN] [default: 127.0.0.1:3986]
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: Option<String>,
    /// Data directory [env: CELLAR_DATA_DIR] [default: /var/lib/cellar for root, else
    /// $XDG_DATA_HOME/cellar]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Block store of the volumes: file:///dir or s3://bucket/prefix?endpoint=... [env:
    /// CELLAR_STORE] [default: file://<data dir>/blocks]
    #[arg(long, value_name = "URL")]
    pub store: Option<String>,
    /// Base URL clients reach the server at, if not http://<listen address> [env: CELLAR_PUBLIC_URL]
    #[arg(long, value_name = "URL")]
    pub public_url: Option<String>,
    /// Most volumes one organization may have [env: CELLAR_VOLUME_QUOTA] [default: 100]
    #[arg(long, value_name = "N")]
    pub volume_quota: Option<u32>,
    /// Run no sandboxes here: only runners that join (`cellar runner`) run them [env:
    /// CELLAR_EMBEDDED_RUNNER=false]
    #[arg(long)]
    pub no_embedded_runner: bool,
    /// A runner without a heartbeat for this long is lost, with its sandboxes [env:
    /// CELLAR_RUNNER_TIMEOUT] [default: 10s]
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub runner_timeout: Option<std::time::Duration>,
    /// Keep the control state and every volume's metadata in PostgreSQL,
    /// postgres://USER:PASS@HOST:PORT/DB (prefer CELLAR_DATABASE: a command line is readable by
    /// every user) [env: CELLAR_DATABASE] [default: SQLite files in the data directory]
    #[arg(long, value_name = "URL")]
    pub database: Option<String>,
    /// Serve every volume as an S3 bucket on this address (docs/GATEWAY.md) [env:
    /// CELLAR_S3_LISTEN] [default: no gateway]
    #[arg(long, value_name = "HOST:PORT")]
    pub s3_listen: Option<String>,
}

pub fn run(args: ServerArgs) -> Result<()> {
    let config = ServerConfig::resolve(ConfigOverrides {
        config_file: args.config,
        listen: args.listen,
        data_dir: args.data_dir,
        store: args.store,
        public_url: args.public_url,
        volume_quota: args.volume_quota,
        embedded_runner: args.no_embedded_runner.then_some(false),
        runner_timeout: args.runner_timeout,
        database: args.database,
        s3_listen: args.s3_listen,
    })?;
    // Without its runner the server starts no sandboxes and mounts nothing.
    if config.embedded_runner {
        preflight::check(&config.data_dir, &config.cellar_bin)?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let server = Server::start(config).await?;
        let api_url = server.api_url();
        println!("Cellar API: {api_url}");
        if let Some(key) = server.bootstrap_key() {
            println!("Bootstrap API key (shown only this once, store it now): {key}");
            println!("  export DAYTONA_API_URL={api_url} DAYTONA_API_KEY={key}");
        }
        server.run_until(shutdown_signal()).await
    })
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate => {}
    }
}
