//! `cellar runner`: runs the sandboxes a Cellar server assigns to this host.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use cellar_server::config::{default_data_dir, DEFAULT_RUNNER_CAPACITY};
use cellar_server::runners::agent::{self, AgentConfig};
use clap::Args;

/// Run sandboxes for a Cellar server on this host: join it with a runner token, heartbeat and
/// serve the runner API the server calls.
///
/// Pass the token through CELLAR_RUNNER_TOKEN or --token-file: a command line is readable by
/// every user of the host.
#[derive(Args, Debug)]
pub struct RunnerArgs {
    /// The server's base URL, e.g. http://10.0.0.1:3986 [env: CELLAR_SERVER_URL]
    #[arg(long, env = "CELLAR_SERVER_URL", value_name = "URL")]
    pub server: String,
    /// Runner token from `cellar admin runner-token create` (prefer CELLAR_RUNNER_TOKEN or
    /// --token-file)
    #[arg(
        long,
        env = "CELLAR_RUNNER_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub token: Option<String>,
    /// File holding the runner token
    #[arg(long, value_name = "FILE", conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Name of this runner (sandboxes pin it with the label cellar.io/runner=NAME) [default:
    /// the host name]
    #[arg(long, env = "CELLAR_RUNNER_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Address the runner API listens on
    #[arg(
        long,
        env = "CELLAR_RUNNER_LISTEN",
        value_name = "HOST:PORT",
        default_value = "0.0.0.0:3987"
    )]
    pub listen: SocketAddr,
    /// URL the server reaches this runner at [default: http://<listen address>, required when
    /// listening on all addresses]
    #[arg(long, env = "CELLAR_RUNNER_ADVERTISE", value_name = "URL")]
    pub advertise: Option<String>,
    /// Data directory (sandboxes and mounts live under it) [env: CELLAR_DATA_DIR] [default:
    /// /var/lib/cellar for root, else $XDG_DATA_HOME/cellar]
    #[arg(long, env = "CELLAR_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Most sandboxes this runner takes
    #[arg(long, value_name = "N", default_value_t = DEFAULT_RUNNER_CAPACITY)]
    pub capacity: u32,
}

pub fn run(args: RunnerArgs) -> Result<()> {
    let token = match (&args.token, &args.token_file) {
        (Some(token), _) => token.trim().to_string(),
        (None, Some(file)) => std::fs::read_to_string(file)
            .with_context(|| format!("reading the runner token from {}", file.display()))?
            .trim()
            .to_string(),
        (None, None) => {
            bail!("a runner token is required: CELLAR_RUNNER_TOKEN, --token-file or --token")
        }
    };
    if token.is_empty() {
        bail!("the runner token is empty");
    }
    // Nothing this process starts inherits the token (mount daemons and sandboxes get clean
    // environments anyway). No thread exists yet.
    std::env::remove_var("CELLAR_RUNNER_TOKEN");
    if args.capacity == 0 {
        bail!("--capacity must be at least 1");
    }
    let server_url = args
        .server
        .trim_end_matches('/')
        .trim_end_matches("/api")
        .to_string();
    url::Url::parse(&server_url)
        .with_context(|| format!("--server {server_url:?} is not a URL"))?;
    let advertise = match args.advertise {
        Some(url) => url.trim_end_matches('/').to_string(),
        None if args.listen.ip().is_unspecified() => bail!(
            "--advertise URL is required when listening on {} (the server must know where to reach this runner)",
            args.listen
        ),
        None => format!("http://{}", args.listen),
    };
    url::Url::parse(&advertise)
        .with_context(|| format!("--advertise {advertise:?} is not a URL"))?;
    let name = match args.name {
        Some(name) => name,
        None => host_name()?,
    };
    let data_dir = match args.data_dir {
        Some(dir) => std::path::absolute(&dir)
            .with_context(|| format!("data directory {}", dir.display()))?,
        None => default_data_dir()?,
    };
    let cellar_bin = match std::env::var_os("CELLAR_BIN").filter(|v| !v.is_empty()) {
        Some(bin) => PathBuf::from(bin),
        None => std::env::current_exe().context("locating the cellar binary")?,
    };
    super::server::preflight::check(&data_dir, &cellar_bin)?;
    let config = AgentConfig {
        server_url,
        token,
        name,
        listen: args.listen,
        advertise,
        data_dir,
        capacity: args.capacity,
        cellar_bin,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(config, super::server::shutdown_signal()))
}

fn host_name() -> Result<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    if unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } != 0 {
        bail!(
            "cannot read the host name: {}; pass --name",
            std::io::Error::last_os_error()
        );
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    // A host name is usually a valid runner name; its first label if it is a FQDN.
    Ok(name.split('.').next().unwrap_or(&name).to_string())
}
