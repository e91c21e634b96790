//! `cellar volume`: create, list, get and delete volumes on a Cellar server.

use anyhow::Result;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::api_client::{field, print_json, print_table, ApiArgs, ApiClient};

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
    /// Show a volume (by name, or by id)
    Get {
        name: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Delete a volume (by name, or by id) and all its data
    Delete { name: String },
}

pub fn run(args: VolumeArgs) -> Result<()> {
    let client = ApiClient::new(&args.api)?;
    match args.command {
        VolumeCommand::Create { name, json } => {
            let volume = client.post("/volumes", &json!({ "name": name }))?;
            show(&volume, json)
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
                    ["id", "name", "state", "createdAt"]
                        .map(|f| field(v, f).to_string())
                        .to_vec()
                })
                .collect();
            print_table(&["ID", "NAME", "STATE", "CREATED"], &rows)
        }
        VolumeCommand::Get { name, json } => show(&lookup(&client, &name)?, json),
        VolumeCommand::Delete { name } => {
            let volume = lookup(&client, &name)?;
            let id = field(&volume, "id");
            client.delete(&format!("/volumes/{id}"))?;
            println!("deleting volume {} ({id})", field(&volume, "name"));
            Ok(())
        }
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
    if let Some(reason) = volume.get("errorReason").and_then(Value::as_str) {
        println!("error    {reason}");
    }
    Ok(())
}
