//! `cellar volume ls`, `rm`, `mv`, `du`, `url` and `quota`: one call or a few each.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use super::super::api_client::{field, print_json, ApiClient, ApiError};
use super::lookup;
use super::remote::{join, Entry, Files, RemotePath};
use super::size::{human, Limit};

pub fn ls(
    client: &ApiClient,
    path: &RemotePath,
    long: bool,
    recursive: bool,
    json: bool,
) -> Result<()> {
    let files = Files::new(client, &path.volume);
    let entries = client
        .block_on(async {
            match files.list(&path.path, recursive).await {
                // `ls FILE` shows that file.
                Err(e) if ApiError::code_of(&e) == Some("NOT_A_DIRECTORY") => {
                    Ok(vec![files.stat(&path.path).await?])
                }
                listed => listed,
            }
        })
        .with_context(|| path.to_string())?;
    if json {
        return print_json(&serde_json::to_value(&entries)?);
    }
    let prefix = join(path.trimmed(), "");
    let name = |entry: &Entry| -> String {
        match entry.path.strip_prefix(&prefix) {
            Some(relative) if recursive && !relative.is_empty() => relative.to_string(),
            _ => entry.name.clone(),
        }
    };
    let width = entries
        .iter()
        .map(|e| e.size.to_string().len())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for entry in &entries {
        if long {
            let link = match &entry.target {
                Some(target) => format!(" -> {target}"),
                None => String::new(),
            };
            out.push_str(&format!(
                "{} {:>width$} {} {}{link}\n",
                permissions(entry),
                entry.size,
                entry.modified_at,
                name(entry)
            ));
        } else {
            out.push_str(&name(entry));
            out.push('\n');
        }
    }
    print!("{out}");
    Ok(())
}

/// `drwxr-xr-x`, as ls -l shows it.
fn permissions(entry: &Entry) -> String {
    let kind = match entry.kind.as_str() {
        "directory" => 'd',
        "symlink" => 'l',
        "file" => '-',
        _ => '?',
    };
    let bits = entry.mode_bits();
    std::iter::once(kind)
        .chain((0..9).map(|i| {
            if bits & (0o400 >> i) == 0 {
                '-'
            } else {
                ['r', 'w', 'x'][i % 3]
            }
        }))
        .collect()
}

pub fn rm(client: &ApiClient, paths: &[RemotePath], recursive: bool) -> Result<()> {
    client.block_on(async {
        for path in paths {
            let files = Files::new(client, &path.volume);
            // Like rm: a directory only with -r, even an empty one.
            if !recursive
                && files
                    .stat(&path.path)
                    .await
                    .with_context(|| path.to_string())?
                    .is_dir()
            {
                bail!("{path} is a directory: use -r to remove it and everything in it");
            }
            files
                .delete(&path.path, recursive)
                .await
                .with_context(|| path.to_string())?;
        }
        Ok(())
    })
}

pub fn mv(
    client: &ApiClient,
    sources: &[RemotePath],
    destination: &RemotePath,
    force: bool,
) -> Result<()> {
    if let Some(other) = sources.iter().find(|s| s.volume != destination.volume) {
        bail!(
            "{other} and {destination} are in different volumes: mv moves within one volume \
             (get and put copy between volumes)"
        );
    }
    let files = Files::new(client, &destination.volume);
    client.block_on(async {
        let existing = files
            .stat_if_exists(&destination.path)
            .await
            .with_context(|| destination.to_string())?;
        let is_dir = existing.as_ref().map(Entry::is_dir);
        if sources.len() > 1 && is_dir != Some(true) {
            bail!(
                "{destination} is not a directory: several sources go into an existing directory"
            );
        }
        let into = sources.len() > 1 || destination.path.ends_with('/') || is_dir == Some(true);
        for source in sources {
            let to = if into {
                join(&destination.path, source.name())
            } else {
                destination.trimmed().to_string()
            };
            let target = destination.with_path(to.clone());
            files.rename(&source.path, &to, force).await.map_err(|e| {
                match ApiError::code_of(&e) {
                    Some("ALREADY_EXISTS") => {
                        anyhow!("{target} exists already: use --force to replace it")
                    }
                    _ => e.context(format!("moving {source} to {target}")),
                }
            })?;
        }
        Ok(())
    })
}

pub fn du(client: &ApiClient, path: &RemotePath, json: bool) -> Result<()> {
    let (bytes, count, quota) = if path.trimmed() == "/" {
        // The whole volume: the metadata engine's counters, no tree walk.
        let usage = Usage::of(&lookup(client, &path.volume)?)?;
        (usage.bytes, usage.files, usage.quota)
    } else {
        let files = Files::new(client, &path.volume);
        let entries = client
            .block_on(async {
                match files.stat(&path.path).await? {
                    entry if entry.is_dir() => files.list(&path.path, true).await,
                    entry => Ok(vec![entry]),
                }
            })
            .with_context(|| path.to_string())?;
        let bytes = entries
            .iter()
            .filter(|e| e.kind == "file")
            .map(|e| e.size)
            .sum();
        (bytes, entries.len() as u64, None)
    };
    if json {
        let mut out = json!({ "path": path.to_string(), "bytes": bytes, "files": count });
        if path.trimmed() == "/" {
            out["quotaBytes"] = json!(quota);
        }
        return print_json(&out);
    }
    println!("{}\t{count} files\t{path}", human(bytes));
    if let Some(quota) = quota {
        println!("{}", quota_line(bytes, quota));
    }
    Ok(())
}

/// What a volume holds and may hold, from its VolumeDto.
struct Usage {
    bytes: u64,
    files: u64,
    quota: Option<u64>,
}

impl Usage {
    fn of(volume: &Value) -> Result<Usage> {
        let usage = volume.get("usage").with_context(|| {
            format!(
                "the server reports no usage for volume {} (is it older than this cellar?)",
                field(volume, "name")
            )
        })?;
        Ok(Usage {
            bytes: usage.get("bytes").and_then(Value::as_u64).unwrap_or(0),
            files: usage.get("files").and_then(Value::as_u64).unwrap_or(0),
            quota: volume.get("quotaBytes").and_then(Value::as_u64),
        })
    }
}

fn quota_line(bytes: u64, quota: u64) -> String {
    format!(
        "quota {} ({:.0}% used)",
        human(quota),
        bytes as f64 * 100.0 / quota.max(1) as f64
    )
}

pub fn url(
    client: &ApiClient,
    path: &RemotePath,
    put: bool,
    expires: Duration,
    json: bool,
) -> Result<()> {
    let files = Files::new(client, &path.volume);
    let signed = client
        .block_on(files.signed_url(&path.path, put, expires))
        .with_context(|| path.to_string())?;
    if json {
        return print_json(&signed);
    }
    println!("{}", field(&signed, "url"));
    Ok(())
}

pub fn quota(client: &ApiClient, name: &str, limit: Option<Limit>, json: bool) -> Result<()> {
    let mut volume = lookup(client, name)?;
    if let Some(limit) = limit {
        volume = client.patch(
            &format!("/volumes/{}", field(&volume, "id")),
            &json!({ "quotaBytes": limit.bytes() }),
        )?;
    }
    let usage = Usage::of(&volume)?;
    if json {
        return print_json(&json!({
            "id": field(&volume, "id"),
            "name": field(&volume, "name"),
            "quotaBytes": usage.quota,
            "usage": { "bytes": usage.bytes, "files": usage.files },
        }));
    }
    match usage.quota {
        Some(quota) => println!("{}", quota_line(usage.bytes, quota)),
        None => println!("quota none"),
    }
    println!("usage {} in {} files", human(usage.bytes), usage.files);
    Ok(())
}
