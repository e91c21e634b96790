//! `cellar sandbox`: create (with volume mounts), list, exec in and delete sandboxes.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::api_client::{field, print_json, print_table, ApiArgs, ApiClient};

/// How long `sandbox create` waits for the sandbox to start.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Manage sandboxes on a Cellar server.
#[derive(Args, Debug)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until it has started
    Create {
        /// Mount a volume: NAME:/mount/path, or NAME:/mount/path:ro for read-only (repeatable)
        #[arg(long = "volume", value_name = "NAME:/PATH[:ro]")]
        volumes: Vec<String>,
        /// Mount only this directory of the volume (needs exactly one --volume)
        #[arg(long, value_name = "PATH")]
        subpath: Option<String>,
        /// Sandbox name (default: its id)
        #[arg(long)]
        name: Option<String>,
        /// Environment variable KEY=VALUE (repeatable)
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Print the sandbox as JSON
        #[arg(long)]
        json: bool,
    },
    /// List sandboxes
    List {
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Show a sandbox
    Get {
        id: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Run a shell command in a sandbox; exits with the command's exit code
    Exec {
        id: String,
        /// The command (joined with spaces, run by /bin/sh -c)
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
        /// Working directory
        #[arg(long)]
        cwd: Option<String>,
        /// Kill the command after this many seconds (exit code 124)
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Delete a sandbox (its volumes and their data stay)
    Delete { id: String },
}

/// Parses `NAME:/path[:ro]`.
fn parse_volume(spec: &str) -> Result<Value> {
    let (name, rest) = spec
        .split_once(':')
        .with_context(|| format!("--volume {spec:?}: expected NAME:/PATH[:ro]"))?;
    let (path, read_only) = match rest.rsplit_once(':') {
        Some((path, "ro")) => (path, true),
        Some((path, "rw")) => (path, false),
        Some(_) => bail!("--volume {spec:?}: the only options after the path are :ro and :rw"),
        None => (rest, false),
    };
    if name.is_empty() || path.is_empty() {
        bail!("--volume {spec:?}: expected NAME:/PATH[:ro]");
    }
    Ok(json!({ "volumeId": name, "mountPath": path, "readOnly": read_only }))
}

pub fn run(args: SandboxArgs) -> Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        SandboxCommand::Create {
            volumes,
            subpath,
            name,
            env,
            json,
        } => {
            let mut mounts = volumes
                .iter()
                .map(|v| parse_volume(v))
                .collect::<Result<Vec<_>>>()?;
            if let Some(subpath) = subpath {
                let [mount] = mounts.as_mut_slice() else {
                    bail!("--subpath needs exactly one --volume");
                };
                mount["subpath"] = json!(subpath);
            }
            let mut environment = serde_json::Map::new();
            for pair in env {
                let (key, value) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair:?}: expected KEY=VALUE"))?;
                environment.insert(key.to_string(), json!(value));
            }
            let mut body = json!({ "volumes": mounts, "env": environment });
            if let Some(name) = name {
                body["name"] = json!(name);
            }
            let sandbox = wait_started(&client, client.post("/sandbox", &body)?)?;
            show(&sandbox, json)
        }
        SandboxCommand::List { json } => {
            let mut sandboxes = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let path = match &cursor {
                    Some(cursor) => format!("/sandbox?cursor={cursor}"),
                    None => "/sandbox".to_string(),
                };
                let page = client.get(&path)?;
                if let Some(items) = page.get("items").and_then(Value::as_array) {
                    sandboxes.extend(items.iter().cloned());
                }
                cursor = page
                    .get("nextCursor")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                if cursor.is_none() {
                    break;
                }
            }
            if json {
                return print_json(&Value::Array(sandboxes));
            }
            let rows: Vec<Vec<String>> = sandboxes
                .iter()
                .map(|s| {
                    let volumes = s
                        .get("volumes")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len);
                    vec![
                        field(s, "id").to_string(),
                        field(s, "name").to_string(),
                        field(s, "state").to_string(),
                        volumes.to_string(),
                        field(s, "createdAt").to_string(),
                    ]
                })
                .collect();
            print_table(&["ID", "NAME", "STATE", "VOLUMES", "CREATED"], &rows)
        }
        SandboxCommand::Get { id, json } => show(&client.get(&format!("/sandbox/{id}"))?, json),
        SandboxCommand::Exec {
            id,
            command,
            cwd,
            timeout,
        } => {
            let sandbox = client.get(&format!("/sandbox/{id}"))?;
            let toolbox = match field(&sandbox, "toolboxProxyUrl") {
                "" => field(
                    &client.get(&format!("/sandbox/{id}/toolbox-proxy-url"))?,
                    "url",
                )
                .to_string(),
                url => url.to_string(),
            };
            let mut body = json!({ "command": command.join(" ") });
            if let Some(cwd) = cwd {
                body["cwd"] = json!(cwd);
            }
            if let Some(timeout) = timeout {
                body["timeout"] = json!(timeout);
            }
            let sandbox_id = field(&sandbox, "id");
            let result = client.post(&format!("{toolbox}/{sandbox_id}/process/execute"), &body)?;
            let mut stdout = std::io::stdout();
            stdout.write_all(field(&result, "result").as_bytes())?;
            stdout.flush()?;
            let code = result.get("exitCode").and_then(Value::as_i64).unwrap_or(1);
            if code != 0 {
                std::process::exit(i32::try_from(code).unwrap_or(1));
            }
            Ok(())
        }
        SandboxCommand::Delete { id } => {
            let sandbox = client.delete(&format!("/sandbox/{id}"))?;
            println!("deleting sandbox {}", field(&sandbox, "id"));
            Ok(())
        }
    }
}

/// Polls until the sandbox leaves `creating`; an error state becomes an error.
fn wait_started(client: &ApiClient, mut sandbox: Value) -> Result<Value> {
    let deadline = Instant::now() + START_TIMEOUT;
    while field(&sandbox, "state") == "creating" {
        if Instant::now() > deadline {
            bail!(
                "sandbox {} did not start within {START_TIMEOUT:?}",
                field(&sandbox, "id")
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        sandbox = client.get(&format!("/sandbox/{}", field(&sandbox, "id")))?;
    }
    match field(&sandbox, "state") {
        "started" => Ok(sandbox),
        state => bail!(
            "sandbox {} is {state}: {}",
            field(&sandbox, "id"),
            field(&sandbox, "errorReason")
        ),
    }
}

fn show(sandbox: &Value, json: bool) -> Result<()> {
    if json {
        return print_json(sandbox);
    }
    for (label, name) in [
        ("id", "id"),
        ("name", "name"),
        ("state", "state"),
        ("created", "createdAt"),
    ] {
        println!("{label:8} {}", field(sandbox, name));
    }
    if let Some(reason) = sandbox.get("errorReason").and_then(Value::as_str) {
        println!("error    {reason}");
    }
    for mount in sandbox
        .get("volumes")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let subpath = field(mount, "subpath");
        let read_only = mount
            .get("readOnly")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        println!(
            "volume   {} at {}{}{}",
            field(mount, "volumeId"),
            field(mount, "mountPath"),
            if subpath.is_empty() {
                String::new()
            } else {
                format!(" (subpath {subpath})")
            },
            if read_only { " read-only" } else { "" }
        );
    }
    Ok(())
}
