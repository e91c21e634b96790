//! `cellar volume`: create, list, get and delete volumes on a Cellar server, and read and write
//! their files through its file API (no sandbox needed).

mod files;
mod remote;
mod size;
mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::api_client::{field, print_json, print_table, ApiArgs, ApiClient};
use remote::RemotePath;
use size::Limit;
use transfer::TransferOptions;

/// Manage volumes on a Cellar server.
#[derive(Args, Debug)]
pub struct VolumeArgs {
    #[command(flatten)]
    pub api: ApiArgs,
    #[command(subcommand)]
    pub command: VolumeCommand,
}

#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume (ready when this returns)
    Create {
        name: String,
        /// Most bytes its files may hold, e.g. 10GiB
        #[arg(long, value_name = "SIZE", value_parser = size::parse_size)]
        quota: Option<u64>,
        /// Print the volume as JSON
        #[arg(long)]
        json: bool,
    },
    /// List volumes
    List {
        /// Include deleted volumes
        #[arg(long)]
        include_deleted: bool,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume (by name, or by id) and all its data
    Delete { name: String },
    /// Upload files and directories (recursively) into a volume
    ///
    /// Like cp -r: into VOLUME:/path if that is a directory (or ends with /, or there are
    /// several sources), else to that path. Parent directories are created. Each file appears
    /// only once it is complete. Symbolic links inside directories are skipped.
    Put {
        /// Local files or directories
        #[arg(required = true, value_name = "LOCAL")]
        sources: Vec<PathBuf>,
        /// Where in the volume
        #[arg(value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        destination: RemotePath,
        #[command(flatten)]
        options: TransferOptions,
    },
    /// Download files and directories (recursively) from a volume, or show a volume
    ///
    /// `get VOLUME:/PATH... LOCAL` is like cp -r: into LOCAL if that is a directory (or ends
    /// with /, or there are several sources), else to that path; `-` writes the files to
    /// standard output. `get NAME` (one argument, no colon) shows the volume (by name or id).
    Get {
        /// VOLUME:/PATH... LOCAL, or NAME
        #[arg(required = true, value_name = "VOLUME:/PATH... LOCAL")]
        args: Vec<String>,
        #[command(flatten)]
        options: TransferOptions,
    },
    /// List a directory of a volume (or show one file)
    Ls {
        /// VOLUME, or VOLUME:/path
        #[arg(value_name = "VOLUME[:/PATH]", value_parser = RemotePath::parse_or_root)]
        path: RemotePath,
        /// Long format: type and permissions, size in bytes, modification time
        #[arg(short, long)]
        long: bool,
        /// The whole tree, as paths relative to the directory
        #[arg(short = 'R', long)]
        recursive: bool,
        /// Print the entries as JSON
        #[arg(long)]
        json: bool,
    },
    /// Remove files (and directories with -r)
    Rm {
        #[arg(required = true, value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        paths: Vec<RemotePath>,
        /// Remove directories and everything in them
        #[arg(short, long)]
        recursive: bool,
    },
    /// Move or rename within a volume (into DESTINATION if it is a directory)
    Mv {
        #[arg(required = true, value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        sources: Vec<RemotePath>,
        #[arg(value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        destination: RemotePath,
        /// Replace an existing destination
        #[arg(short, long)]
        force: bool,
    },
    /// How much a volume (its usage counters) or a directory (its files' sizes) holds
    Du {
        #[arg(value_name = "VOLUME[:/PATH]", value_parser = RemotePath::parse_or_root)]
        path: RemotePath,
        /// Print JSON (exact bytes)
        #[arg(long)]
        json: bool,
    },
    /// Write files of a volume to standard output
    Cat {
        #[arg(required = true, value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        paths: Vec<RemotePath>,
    },
    /// Print a signed URL that reads (or with --put, writes) one file without an API key
    Url {
        #[arg(value_name = "VOLUME:/PATH", value_parser = RemotePath::parse)]
        path: RemotePath,
        /// A URL for uploading (HTTP PUT) instead of downloading
        #[arg(long)]
        put: bool,
        /// How long the URL works
        #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
        expires: Duration,
        /// Print JSON (url, method, expiresAt)
        #[arg(long)]
        json: bool,
    },
    /// Show a volume's byte quota and usage, or set it (SIZE, e.g. 10GiB, or none)
    Quota {
        name: String,
        #[arg(value_name = "SIZE|none", value_parser = size::parse_limit)]
        limit: Option<Limit>,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
}

pub fn run(args: VolumeArgs) -> Result<()> {
    // Usage errors first (exit code 2), before the client needs a key.
    let download = match &args.command {
        VolumeCommand::Get { args, .. } => download_args(args),
        _ => None,
    };
    let client = ApiClient::new(&args.api)?;
    match args.command {
        VolumeCommand::Create { name, quota, json } => {
            let mut body = json!({ "name": name });
            if let Some(quota) = quota {
                body["quotaBytes"] = json!(quota);
            }
            show(&client.post("/volumes", &body)?, json)
        }
        VolumeCommand::List {
            include_deleted,
            json,
        } => {
            let volumes = client.get(&format!("/volumes?includeDeleted={include_deleted}"))?;
            if json {
                return print_json(&volumes);
            }
            let rows: Vec<Vec<String>> = volumes
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let mut row = ["id", "name", "state"]
                        .map(|f| field(v, f).to_string())
                        .to_vec();
                    row.push(
                        v.pointer("/usage/bytes")
                            .and_then(Value::as_u64)
                            .map(size::human)
                            .unwrap_or_default(),
                    );
                    row.push(field(v, "createdAt").to_string());
                    row
                })
                .collect();
            print_table(&["ID", "NAME", "STATE", "USED", "CREATED"], &rows)
        }
        VolumeCommand::Delete { name } => {
            let volume = lookup(&client, &name)?;
            let id = field(&volume, "id");
            client.delete(&format!("/volumes/{id}"))?;
            println!("deleting volume {} ({id})", field(&volume, "name"));
            Ok(())
        }
        VolumeCommand::Put {
            sources,
            destination,
            options,
        } => transfer::put(&client, &sources, &destination, &options),
        VolumeCommand::Get { args, options } => match download {
            Some((sources, destination)) => {
                transfer::get(&client, &sources, &destination, &options)
            }
            None => show(&lookup(&client, &args[0])?, options.json),
        },
        VolumeCommand::Ls {
            path,
            long,
            recursive,
            json,
        } => files::ls(&client, &path, long, recursive, json),
        VolumeCommand::Rm { paths, recursive } => files::rm(&client, &paths, recursive),
        VolumeCommand::Mv {
            sources,
            destination,
            force,
        } => files::mv(&client, &sources, &destination, force),
        VolumeCommand::Du { path, json } => files::du(&client, &path, json),
        VolumeCommand::Cat { paths } => transfer::cat(&client, &paths),
        VolumeCommand::Url {
            path,
            put,
            expires,
            json,
        } => files::url(&client, &path, put, expires, json),
        VolumeCommand::Quota { name, limit, json } => files::quota(&client, &name, limit, json),
    }
}

/// The sources and destination of `get VOLUME:/PATH... LOCAL`; `None` for `get NAME`. Exits
/// with a usage error (2) if they do not parse.
fn download_args(args: &[String]) -> Option<(Vec<RemotePath>, String)> {
    let usage = |message: String| -> ! {
        clap::Error::raw(
            clap::error::ErrorKind::ValueValidation,
            format!("{message}\n"),
        )
        .exit()
    };
    match args {
        [name] if !name.contains(':') => None,
        [_] => usage("get VOLUME:/PATH... LOCAL: name where to put the files (a local path, or - for standard output)".into()),
        [sources @ .., destination] => Some((
            sources
                .iter()
                .map(|s| RemotePath::parse(s).unwrap_or_else(|e| usage(e)))
                .collect(),
            destination.clone(),
        )),
        [] => unreachable!("clap requires one argument"),
    }
}

/// A volume by name, falling back to its id.
fn lookup(client: &ApiClient, name_or_id: &str) -> Result<Value> {
    client
        .get(&format!("/volumes/by-name/{name_or_id}"))
        .or_else(|by_name| {
            client
                .get(&format!("/volumes/{name_or_id}"))
                .map_err(|_| by_name)
        })
}

fn show(volume: &Value, json: bool) -> Result<()> {
    if json {
        return print_json(volume);
    }
    for (label, name) in [
        ("id", "id"),
        ("name", "name"),
        ("state", "state"),
        ("created", "createdAt"),
    ] {
        println!("{label:8} {}", field(volume, name));
    }
    if let Some(usage) = volume.get("usage") {
        let bytes = usage.get("bytes").and_then(Value::as_u64).unwrap_or(0);
        let files = usage.get("files").and_then(Value::as_u64).unwrap_or(0);
        println!("usage    {} in {files} files", size::human(bytes));
    }
    if let Some(quota) = volume.get("quotaBytes").and_then(Value::as_u64) {
        println!("quota    {}", size::human(quota));
    }
    if let Some(reason) = volume.get("errorReason").and_then(Value::as_str) {
        println!("error    {reason}");
    }
    Ok(())
}
