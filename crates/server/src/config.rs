//! Server configuration: command-line flags > `CELLAR_*` environment > TOML file > defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:3986";
pub const DEFAULT_VOLUME_QUOTA: u32 = 100;
/// How long a runner may go without a heartbeat before it counts as lost.
pub const DEFAULT_RUNNER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// How many sandboxes a runner (the embedded one, or `cellar runner` by default) takes.
pub const DEFAULT_RUNNER_CAPACITY: u32 = 1024;

/// Request size and rate limits (docs/CONFIGURATION.md, "Limits").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest body of a request other than a file upload (413 past it).
    pub max_body_bytes: u64,
    /// Largest body of a file upload (volume file content, toolbox bulk upload), streamed.
    pub max_upload_bytes: u64,
    /// Requests a second one API key may make on average (429 past it); 0: no limit.
    pub rate_per_sec: u32,
    /// Requests one API key may make at once above the average.
    pub rate_burst: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            // axum's default, which every endpoint had before the limit was configurable.
            max_body_bytes: 2 << 20,
            max_upload_bytes: 64 << 30,
            rate_per_sec: 500,
            rate_burst: 1000,
        }
    }
}

/// Values given on the command line; `None` falls through to the environment, the file, the default.
#[derive(Clone, Debug, Default)]
pub struct ConfigOverrides {
    pub config_file: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub store: Option<String>,
    pub public_url: Option<String>,
    pub volume_quota: Option<u32>,
    /// `Some(false)`: run without the embedded runner (`--no-embedded-runner`).
    pub embedded_runner: Option<bool>,
    pub runner_timeout: Option<std::time::Duration>,
    /// `postgres://...`: control state and volume metadata in PostgreSQL.
    pub database: Option<String>,
    /// Where the S3 gateway listens (off unless set).
    pub s3_listen: Option<String>,
}

/// A database URL; it may hold a password, so Debug shows it redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&cellar_sql::redact(&self.0))
    }
}

/// The TOML file (every key optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    store: Option<String>,
    public_url: Option<String>,
    volume_quota: Option<u32>,
    embedded_runner: Option<bool>,
    /// E.g. "10s".
    runner_timeout: Option<String>,
    database: Option<String>,
    metrics_token: Option<String>,
    s3_listen: Option<String>,
    s3_public_url: Option<String>,
    max_body_bytes: Option<u64>,
    max_upload_bytes: Option<u64>,
    rate_limit: Option<u32>,
    rate_burst: Option<u32>,
    s3: Option<S3Credentials>,
}

/// Object-store credentials from the TOML file (the environment's AWS_* variables win).
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Credentials {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    // Never print secrets, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("S3Credentials { .. }")
    }
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Block store URL of every volume (`file:///dir` or `s3://bucket/prefix?endpoint=...`).
    pub store_url: String,
    /// Base URL clients reach this server at (toolboxProxyUrl is built from it); `None` means
    /// `http://<bound address>`.
    pub public_url: Option<String>,
    pub volume_quota: u32,
    pub s3_credentials: S3Credentials,
    /// The `cellar` binary the embedded runner starts mount daemons with (`CELLAR_BIN`, else
    /// this executable).
    pub cellar_bin: PathBuf,
    /// Whether this server runs sandboxes itself (the runner named `local`).
    pub embedded_runner: bool,
    /// Sandboxes the embedded runner takes.
    pub runner_capacity: u32,
    /// A runner without a heartbeat for this long is lost, and so are its sandboxes.
    pub runner_timeout: std::time::Duration,
    /// PostgreSQL database of the control state and of every volume's metadata; `None`: SQLite
    /// files in the data directory.
    pub database: Option<DatabaseUrl>,
    /// Bearer token that `GET /metrics` requires; `None`: the endpoint is open.
    pub metrics_token: Option<MetricsToken>,
    pub limits: Limits,
    /// Address of the S3 gateway (docs/GATEWAY.md); `None`: no gateway.
    pub s3_listen: Option<SocketAddr>,
    /// Endpoint URL S3 clients reach the gateway at; `None`: `http://<its bound address>`.
    pub s3_public_url: Option<String>,
}

/// The token of `GET /metrics`; Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct MetricsToken(pub String);

impl std::fmt::Debug for MetricsToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricsToken(..)")
    }
}

impl ServerConfig {
    /// Resolves the configuration from flags, the `CELLAR_*` environment and the TOML file.
    pub fn resolve(flags: ConfigOverrides) -> anyhow::Result<ServerConfig> {
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let config_file = flags
            .config_file
            .clone()
            .or_else(|| env("CELLAR_CONFIG").map(PathBuf::from));
        let file = match &config_file {
            Some(path) => read_config_file(path)?,
            None => ConfigFile::default(),
        };
        let listen = flags
            .listen
            .or_else(|| env("CELLAR_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen: SocketAddr = listen
            .parse()
            .with_context(|| format!("listen address {listen:?} is not HOST:PORT"))?;
        let data_dir = flags
            .data_dir
            .or_else(|| env("CELLAR_DATA_DIR").map(PathBuf::from))
            .or(file.data_dir)
            .map_or_else(default_data_dir, Ok)?;
        let data_dir = std::path::absolute(&data_dir)
            .with_context(|| format!("data directory {}", data_dir.display()))?;
        let store_url = flags
            .store
            .or_else(|| env("CELLAR_STORE"))
            .or(file.store)
            .unwrap_or_else(|| default_store_url(&data_dir));
        let public_url = flags
            .public_url
            .or_else(|| env("CELLAR_PUBLIC_URL"))
            .or(file.public_url)
            .map(|url| url.trim_end_matches('/').to_string());
        let volume_quota = match flags.volume_quota {
            Some(quota) => quota,
            None => match env("CELLAR_VOLUME_QUOTA") {
                Some(v) => v.parse().context("CELLAR_VOLUME_QUOTA is not a number")?,
                None => file.volume_quota.unwrap_or(DEFAULT_VOLUME_QUOTA),
            },
        };
        let embedded_runner = match flags.embedded_runner {
            Some(on) => on,
            None => match env("CELLAR_EMBEDDED_RUNNER") {
                Some(v) => parse_bool(&v).context("CELLAR_EMBEDDED_RUNNER")?,
                None => file.embedded_runner.unwrap_or(true),
            },
        };
        let runner_timeout = match flags.runner_timeout {
            Some(timeout) => timeout,
            None => match env("CELLAR_RUNNER_TIMEOUT").or(file.runner_timeout) {
                Some(v) => humantime::parse_duration(&v)
                    .with_context(|| format!("runner timeout {v:?} is not a duration like 10s"))?,
                None => DEFAULT_RUNNER_TIMEOUT,
            },
        };
        let database = flags
            .database
            .or_else(|| env("CELLAR_DATABASE"))
            .or(file.database)
            .map(DatabaseUrl);
        if let Some(url) = &database {
            if !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://")) {
                anyhow::bail!(
                    "the database {:?} is not a postgres:// URL (leave it unset for SQLite in the data directory)",
                    url
                );
            }
        }
        // No flag: a token on the command line would show in `ps`.
        let metrics_token = env("CELLAR_METRICS_TOKEN")
            .or(file.metrics_token)
            .map(MetricsToken);
        let s3_listen = match flags
            .s3_listen
            .or_else(|| env("CELLAR_S3_LISTEN"))
            .or(file.s3_listen)
        {
            Some(addr) => Some(
                addr.parse()
                    .with_context(|| format!("S3 gateway address {addr:?} is not HOST:PORT"))?,
            ),
            None => None,
        };
        let s3_public_url = env("CELLAR_S3_PUBLIC_URL")
            .or(file.s3_public_url)
            .map(|url| url.trim_end_matches('/').to_string());
        let defaults = Limits::default();
        let limits = Limits {
            max_body_bytes: number("CELLAR_MAX_BODY_BYTES", file.max_body_bytes)?
                .unwrap_or(defaults.max_body_bytes),
            max_upload_bytes: number("CELLAR_MAX_UPLOAD_BYTES", file.max_upload_bytes)?
                .unwrap_or(defaults.max_upload_bytes),
            rate_per_sec: number("CELLAR_RATE_LIMIT", file.rate_limit)?
                .unwrap_or(defaults.rate_per_sec),
            rate_burst: number("CELLAR_RATE_BURST", file.rate_burst)?
                .unwrap_or(defaults.rate_burst),
        };
        Ok(ServerConfig {
            s3_listen,
            s3_public_url,
            database,
            metrics_token,
            limits,
            listen,
            data_dir,
            store_url,
            public_url,
            volume_quota,
            embedded_runner,
            runner_capacity: DEFAULT_RUNNER_CAPACITY,
            runner_timeout,
            s3_credentials: file.s3.unwrap_or_default(),
            cellar_bin: match env("CELLAR_BIN") {
                Some(bin) => PathBuf::from(bin),
                None => std::env::current_exe().context("locating the cellar binary")?,
            },
        })
    }

    /// Defaults around a data directory and a `cellar` binary (tests, embedding).
    pub fn with_data_dir(data_dir: &Path, cellar_bin: &Path) -> ServerConfig {
        ServerConfig {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            data_dir: data_dir.to_path_buf(),
            store_url: default_store_url(data_dir),
            public_url: None,
            volume_quota: DEFAULT_VOLUME_QUOTA,
            s3_credentials: S3Credentials::default(),
            cellar_bin: cellar_bin.to_path_buf(),
            embedded_runner: true,
            runner_capacity: DEFAULT_RUNNER_CAPACITY,
            runner_timeout: DEFAULT_RUNNER_TIMEOUT,
            database: None,
            metrics_token: None,
            limits: Limits::default(),
            s3_listen: None,
            s3_public_url: None,
        }
    }

    /// The object-store credentials the mount daemons and volume maintenance need: the
    /// environment's AWS_* variables, else the TOML file's `[s3]` keys.
    pub fn store_env(&self) -> Vec<(String, String)> {
        let from_file = [
            ("AWS_ACCESS_KEY_ID", &self.s3_credentials.access_key_id),
            (
                "AWS_SECRET_ACCESS_KEY",
                &self.s3_credentials.secret_access_key,
            ),
        ];
        let mut vars = Vec::new();
        for (name, file_value) in from_file {
            if let Some(value) = std::env::var(name).ok().or_else(|| file_value.clone()) {
                vars.push((name.to_string(), value));
            }
        }
        for name in ["AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION"] {
            if let Ok(value) = std::env::var(name) {
                vars.push((name.to_string(), value));
            }
        }
        vars
    }
}

impl ServerConfig {
    /// Where the control state lives.
    pub(crate) fn control_location(&self) -> anyhow::Result<crate::db::Location> {
        Ok(crate::db::Location::new(
            &self.data_dir,
            self.database.as_ref().map(|url| url.0.as_str()),
        )?)
    }
}

/// The environment variable `name` as a number, else the TOML file's value.
fn number<T: std::str::FromStr>(name: &str, from_file: Option<T>) -> anyhow::Result<Option<T>> {
    match std::env::var(name).ok().filter(|v| !v.is_empty()) {
        Some(v) => match v.parse() {
            Ok(n) => Ok(Some(n)),
            Err(_) => anyhow::bail!("{name}={v:?} is not a whole number"),
        },
        None => Ok(from_file),
    }
}

fn parse_bool(value: &str) -> anyhow::Result<bool> {
    match value {
        "1" | "true" | "yes" => Ok(true),
        "0" | "false" | "no" => Ok(false),
        other => anyhow::bail!("{other:?} is not true or false"),
    }
}

fn read_config_file(path: &Path) -> anyhow::Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing config file {}", path.display()))
}

/// `/var/lib/cellar` for root, else `$XDG_DATA_HOME/cellar` (`~/.local/share/cellar`).
pub fn default_data_dir() -> anyhow::Result<PathBuf> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(PathBuf::from("/var/lib/cellar"));
    }
    if let Some(xdg) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(xdg).join("cellar"));
    }
    let home = std::env::var_os("HOME")
        .context("neither XDG_DATA_HOME nor HOME is set; pass --data-dir")?;
    Ok(PathBuf::from(home).join(".local/share/cellar"))
}

fn default_store_url(data_dir: &Path) -> String {
    format!("file://{}", data_dir.join("blocks").display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_come_from_the_toml_file_or_default() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cellar.toml");
        std::fs::write(
            &file,
            "max_body_bytes = 1234\nmax_upload_bytes = 99999\nrate_limit = 7\nrate_burst = 9\n",
        )
        .unwrap();
        let flags = |file: Option<PathBuf>| ConfigOverrides {
            config_file: file,
            data_dir: Some(dir.path().to_path_buf()),
            ..ConfigOverrides::default()
        };
        let config = ServerConfig::resolve(flags(Some(file))).unwrap();
        assert_eq!(
            config.limits,
            Limits {
                max_body_bytes: 1234,
                max_upload_bytes: 99999,
                rate_per_sec: 7,
                rate_burst: 9,
            }
        );
        let config = ServerConfig::resolve(flags(None)).unwrap();
        assert_eq!(config.limits, Limits::default());
    }
}
