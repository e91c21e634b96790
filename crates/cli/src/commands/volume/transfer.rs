//! `cellar volume put`, `get` and `cat`: many files at once, each streamed between a local file
//! and the server (never whole in memory), under one progress bar.

use std::collections::HashSet;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use futures::{StreamExt, TryStreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use super::super::api_client::{print_json, ApiClient, ApiError, RatePacing};
use super::remote::{join, Entry, Files, RemotePath};
use super::size::human;

/// Bytes read from a local file per chunk of an upload, and buffered per download.
const CHUNK: usize = 1 << 20;

#[derive(Args, Debug)]
pub struct TransferOptions {
    /// Replace files that exist at the destination
    #[arg(short, long)]
    force: bool,
    /// Files transferred at once
    #[arg(short, long, value_name = "N", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=256))]
    jobs: u16,
    /// Print what was transferred as JSON (no progress bar)
    #[arg(long)]
    pub json: bool,
    /// Print nothing but errors (no progress bar)
    #[arg(short, long)]
    quiet: bool,
}

impl TransferOptions {
    /// Bytes and files done, on stderr; hidden unless stderr is a terminal (indicatif checks)
    /// and the output is for a person.
    fn progress(&self, files: usize, bytes: u64) -> Progress {
        let bar = if self.json || self.quiet || !std::io::stderr().is_terminal() {
            ProgressBar::hidden()
        } else {
            ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr())
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{binary_bytes}/{binary_total_bytes} {wide_bar} {binary_bytes_per_sec} {msg} {eta}",
            )
            .expect("a valid template"),
        );
        let progress = Progress {
            bar,
            files,
            done: AtomicUsize::new(0),
            started: Instant::now(),
        };
        progress.file_done(0);
        progress
    }

    /// Prints the summary (or the JSON list) once everything is done.
    fn report(&self, progress: &Progress, verb: &str, done: Vec<Value>) -> Result<()> {
        progress.bar.finish_and_clear();
        if self.json {
            return print_json(&Value::Array(done));
        }
        if !self.quiet {
            let bytes: u64 = done.iter().filter_map(|d| d["size"].as_u64()).sum();
            let seconds = progress.started.elapsed().as_secs_f64();
            println!(
                "{verb} {}, {} in {seconds:.1} s ({}/s)",
                plural_files(done.len()),
                human(bytes),
                human((bytes as f64 / seconds.max(0.001)) as u64)
            );
        }
        Ok(())
    }

    fn warn(&self, message: String) {
        if !self.quiet {
            eprintln!("warning: {message}");
        }
    }
}

struct Progress {
    bar: ProgressBar,
    files: usize,
    done: AtomicUsize,
    started: Instant,
}

impl Progress {
    fn file_done(&self, count: usize) {
        let done = self.done.fetch_add(count, Ordering::Relaxed) + count;
        self.bar
            .set_message(format!("{done}/{}", plural_files(self.files)));
    }
}

fn plural_files(n: usize) -> String {
    format!("{n} file{}", if n == 1 { "" } else { "s" })
}

/// One local file to upload.
struct Upload {
    local: PathBuf,
    remote: String,
    size: u64,
    mode: u32,
}

#[derive(Default)]
struct PutPlan {
    /// Directories to create, with their local modes.
    dirs: Vec<(String, u32)>,
    files: Vec<Upload>,
    /// What each source becomes: (remote path, whether it is a directory).
    roots: Vec<(String, bool)>,
    /// Symbolic links and special files (the file API stores neither).
    skipped: Vec<PathBuf>,
}

pub fn put(
    client: &ApiClient,
    sources: &[PathBuf],
    destination: &RemotePath,
    options: &TransferOptions,
) -> Result<()> {
    let files = Files::new(client, &destination.volume);
    client.block_on(async {
        let plan = plan_put(&files, sources, destination).await?;
        for skipped in &plan.skipped {
            options.warn(format!(
                "skipping {}: not a regular file or a directory",
                skipped.display()
            ));
        }
        if !options.force {
            refuse_overwrite_remote(&files, &plan, destination).await?;
        }
        let progress = options.progress(plan.files.len(), plan.files.iter().map(|u| u.size).sum());
        // Parents before children (each with its own mode), the directories of one depth at once.
        let mut dirs: Vec<&(String, u32)> = plan.dirs.iter().collect();
        dirs.sort_by_key(|(dir, _)| dir.matches('/').count());
        for level in
            dirs.chunk_by(|(a, _), (b, _)| a.matches('/').count() == b.matches('/').count())
        {
            futures::stream::iter(level)
                .map(|(dir, mode)| {
                    let files = &files;
                    async move {
                        files
                            .mkdir(dir, *mode)
                            .await
                            .with_context(|| destination.with_path(dir.clone()).to_string())
                    }
                })
                .buffer_unordered(usize::from(options.jobs))
                .try_collect::<Vec<_>>()
                .await?;
        }
        let done: Vec<Value> = futures::stream::iter(&plan.files)
            .map(|upload| upload_one(&files, upload, destination, options.force, &progress))
            .buffer_unordered(usize::from(options.jobs))
            .try_collect()
            .await?;
        options.report(&progress, "uploaded", done)
    })
}

async fn plan_put(
    files: &Files<'_>,
    sources: &[PathBuf],
    destination: &RemotePath,
) -> Result<PutPlan> {
    let existing = files
        .stat_if_exists(&destination.path)
        .await
        .with_context(|| destination.to_string())?;
    let is_dir = existing.as_ref().map(Entry::is_dir);
    if sources.len() > 1 && is_dir == Some(false) {
        bail!("{destination} is a file: several sources go into a directory");
    }
    let into = sources.len() > 1 || destination.path.ends_with('/') || is_dir == Some(true);
    let mut plan = PutPlan::default();
    for source in sources {
        let metadata = std::fs::metadata(source)
            .with_context(|| format!("cannot read {}", source.display()))?;
        let target = if into {
            join(&destination.path, &local_name(source)?)
        } else {
            destination.trimmed().to_string()
        };
        if metadata.is_dir() {
            plan.roots.push((target.clone(), true));
            plan.dirs.push((target.clone(), mode_of(&metadata)));
            walk(source, &target, &mut plan)?;
        } else if metadata.is_file() {
            plan.roots.push((target.clone(), false));
            plan.files.push(Upload {
                local: source.clone(),
                remote: target,
                size: metadata.len(),
                mode: mode_of(&metadata),
            });
        } else {
            bail!("{}: not a regular file or a directory", source.display());
        }
    }
    Ok(plan)
}

/// The name a source gets inside a destination directory (`.` is named after the directory).
fn local_name(source: &Path) -> Result<String> {
    let name = match source.file_name() {
        Some(name) => name.to_os_string(),
        None => std::fs::canonicalize(source)
            .with_context(|| format!("cannot read {}", source.display()))?
            .file_name()
            .map(|n| n.to_os_string())
            .with_context(|| format!("{}: name a directory below /", source.display()))?,
    };
    utf8(name, source)
}

fn utf8(name: std::ffi::OsString, path: &Path) -> Result<String> {
    name.into_string().map_err(|_| {
        anyhow!(
            "{}: the name is not UTF-8 (volume paths are UTF-8 text)",
            path.display()
        )
    })
}

fn mode_of(metadata: &std::fs::Metadata) -> u32 {
    metadata.permissions().mode() & 0o7777
}

/// Adds a local directory's tree (without following symbolic links), sorted by name.
fn walk(dir: &Path, remote: &str, plan: &mut PutPlan) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read the directory {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("cannot read the directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        let target = join(remote, &utf8(entry.file_name(), &path)?);
        let metadata = std::fs::symlink_metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if metadata.is_dir() {
            plan.dirs.push((target.clone(), mode_of(&metadata)));
            walk(&path, &target, plan)?;
        } else if metadata.is_file() {
            plan.files.push(Upload {
                local: path,
                remote: target,
                size: metadata.len(),
                mode: mode_of(&metadata),
            });
        } else {
            plan.skipped.push(path);
        }
    }
    Ok(())
}

/// Without --force nothing is uploaded if any file would replace one in the volume.
async fn refuse_overwrite_remote(
    files: &Files<'_>,
    plan: &PutPlan,
    destination: &RemotePath,
) -> Result<()> {
    let mut existing = HashSet::new();
    for (root, is_dir) in &plan.roots {
        let remote = destination.with_path(root.clone());
        match files
            .stat_if_exists(root)
            .await
            .with_context(|| remote.to_string())?
        {
            None => {}
            Some(entry) if *is_dir && !entry.is_dir() => {
                bail!("{remote} exists and is not a directory: remove it first")
            }
            Some(entry) if !*is_dir && entry.is_dir() => {
                bail!("{remote} is a directory: name a file path, or remove it first")
            }
            Some(_) if *is_dir => existing.extend(
                files
                    .list(root, true)
                    .await
                    .with_context(|| remote.to_string())?
                    .into_iter()
                    .filter(|e| !e.is_dir())
                    .map(|e| e.path),
            ),
            Some(entry) => {
                existing.insert(entry.path);
            }
        }
    }
    let clashes: Vec<&str> = plan
        .files
        .iter()
        .map(|u| u.remote.as_str())
        .filter(|path| existing.contains(*path))
        .collect();
    match clashes.as_slice() {
        [] => Ok(()),
        [one] => bail!(
            "{} exists already: use --force to overwrite it",
            destination.with_path(one.to_string())
        ),
        [first, ..] => bail!(
            "{} files exist already in {} (e.g. {first}): use --force to overwrite them",
            clashes.len(),
            destination.volume
        ),
    }
}

async fn upload_one(
    files: &Files<'_>,
    upload: &Upload,
    destination: &RemotePath,
    force: bool,
    progress: &Progress,
) -> Result<Value> {
    let remote = destination.with_path(upload.remote.clone());
    let mut pacing = RatePacing::default();
    let entry = loop {
        let file = tokio::fs::File::open(&upload.local)
            .await
            .with_context(|| format!("cannot read {}", upload.local.display()))?;
        let bar = progress.bar.clone();
        let sent = Arc::new(AtomicU64::new(0));
        let counted = sent.clone();
        let body =
            tokio_util::io::ReaderStream::with_capacity(file, CHUNK).inspect_ok(move |chunk| {
                bar.inc(chunk.len() as u64);
                counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            });
        let result = files
            .upload(
                &upload.remote,
                reqwest::Body::wrap_stream(body),
                upload.size,
                upload.mode,
                force,
            )
            .await;
        // Over the key's rate: the file is sent again, whole, after the server's wait.
        match pacing.wait(&result) {
            Some(wait) => {
                progress.bar.dec(sent.load(Ordering::Relaxed));
                tokio::time::sleep(wait).await;
            }
            None => break result,
        }
    };
    let entry = entry.map_err(|e| match ApiError::code_of(&e) {
        Some("ALREADY_EXISTS") => {
            anyhow!("{remote} exists already: use --force to overwrite it")
        }
        _ => e.context(format!("uploading {} to {remote}", upload.local.display())),
    })?;
    progress.file_done(1);
    Ok(json!({
        "source": upload.local,
        "destination": remote.to_string(),
        "size": entry.size,
    }))
}

/// One file of a volume to download.
struct Download {
    remote: RemotePath,
    local: PathBuf,
    size: u64,
    mode: u32,
}

#[derive(Default)]
struct GetPlan {
    /// Local directories to create, parents first, with the volume's modes.
    dirs: Vec<(PathBuf, u32)>,
    files: Vec<Download>,
    /// Symbolic links to recreate: (local path, target).
    links: Vec<(PathBuf, String)>,
    skipped: Vec<RemotePath>,
}

pub fn get(
    client: &ApiClient,
    sources: &[RemotePath],
    destination: &str,
    options: &TransferOptions,
) -> Result<()> {
    if destination == "-" {
        return cat(client, sources);
    }
    client.block_on(async {
        let plan = plan_get(client, sources, destination).await?;
        for skipped in &plan.skipped {
            options.warn(format!(
                "skipping {skipped}: not a file, a directory or a link"
            ));
        }
        if !options.force {
            refuse_overwrite_local(&plan)?;
        }
        for (dir, _) in &plan.dirs {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create the directory {}", dir.display()))?;
        }
        let progress = options.progress(plan.files.len(), plan.files.iter().map(|d| d.size).sum());
        let done: Vec<Value> = futures::stream::iter(&plan.files)
            .map(|download| download_one(client, download, &progress))
            .buffer_unordered(usize::from(options.jobs))
            .try_collect()
            .await?;
        for (link, target) in &plan.links {
            if options.force && std::fs::symlink_metadata(link).is_ok() {
                std::fs::remove_file(link)
                    .with_context(|| format!("cannot replace {}", link.display()))?;
            }
            std::os::unix::fs::symlink(target, link)
                .with_context(|| format!("cannot create the link {}", link.display()))?;
        }
        // Modes last, children first: a read-only directory must not stop its own download.
        for (dir, mode) in plan.dirs.iter().rev() {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(*mode))
                .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
        }
        options.report(&progress, "downloaded", done)
    })
}

async fn plan_get(
    client: &ApiClient,
    sources: &[RemotePath],
    destination: &str,
) -> Result<GetPlan> {
    let local = PathBuf::from(destination);
    let is_dir = local.is_dir();
    if sources.len() > 1 && local.exists() && !is_dir {
        bail!("{destination} is a file: several sources go into a directory");
    }
    let into = sources.len() > 1 || destination.ends_with('/') || is_dir;
    let mut plan = GetPlan::default();
    for source in sources {
        let files = Files::new(client, &source.volume);
        let entry = files
            .stat(&source.path)
            .await
            .with_context(|| source.to_string())?;
        let target = if into {
            local.join(source.name())
        } else {
            local.clone()
        };
        if !entry.is_dir() {
            plan.add(source.clone(), target, entry);
            continue;
        }
        plan.dirs.push((target.clone(), entry.mode_bits()));
        let prefix = join(source.trimmed(), "");
        for entry in files
            .list(&source.path, true)
            .await
            .with_context(|| source.to_string())?
        {
            let relative = entry
                .path
                .strip_prefix(&prefix)
                .map(Path::new)
                .filter(|r| r.components().all(|c| matches!(c, Component::Normal(_))))
                .with_context(|| {
                    format!(
                        "the server listed {:?}, which is not below {source}",
                        entry.path
                    )
                })?;
            let local = target.join(relative);
            let remote = source.with_path(entry.path.clone());
            if entry.is_dir() {
                plan.dirs.push((local, entry.mode_bits()));
            } else {
                plan.add(remote, local, entry);
            }
        }
    }
    Ok(plan)
}

impl GetPlan {
    fn add(&mut self, remote: RemotePath, local: PathBuf, entry: Entry) {
        match entry.kind.as_str() {
            "file" => self.files.push(Download {
                remote,
                local,
                size: entry.size,
                mode: entry.mode_bits(),
            }),
            "symlink" => self
                .links
                .push((local, entry.target.clone().unwrap_or_default())),
            _ => self.skipped.push(remote),
        }
    }
}

/// Without --force nothing is downloaded if any file would replace a local one.
fn refuse_overwrite_local(plan: &GetPlan) -> Result<()> {
    for (dir, _) in &plan.dirs {
        if dir.exists() && !dir.is_dir() {
            bail!(
                "{} exists and is not a directory: remove it first",
                dir.display()
            );
        }
    }
    let clashes: Vec<&Path> = plan
        .files
        .iter()
        .map(|d| d.local.as_path())
        .chain(plan.links.iter().map(|(link, _)| link.as_path()))
        .filter(|path| std::fs::symlink_metadata(path).is_ok())
        .collect();
    match clashes.as_slice() {
        [] => Ok(()),
        [one] => bail!(
            "{} exists already: use --force to overwrite it",
            one.display()
        ),
        [first, ..] => bail!(
            "{} local files exist already (e.g. {}): use --force to overwrite them",
            clashes.len(),
            first.display()
        ),
    }
}

/// Streams one file into a hidden file next to its destination, then renames it there: an
/// interrupted download leaves the destination as it was.
async fn download_one(
    client: &ApiClient,
    download: &Download,
    progress: &Progress,
) -> Result<Value> {
    let remote = &download.remote;
    let response = Files::new(client, &remote.volume)
        .download(&remote.path)
        .await
        .with_context(|| remote.to_string())?;
    let name = download
        .local
        .file_name()
        .with_context(|| format!("{}: not a file name", download.local.display()))?;
    let mut partial_name = std::ffi::OsString::from(".");
    partial_name.push(name);
    partial_name.push(format!(".cellar-{}.part", std::process::id()));
    let partial = download.local.with_file_name(partial_name);
    let written = async {
        let file = tokio::fs::File::create(&partial).await?;
        let expected = response.content_length();
        let mut out = tokio::io::BufWriter::with_capacity(CHUNK, file);
        let mut body = response.bytes_stream();
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(std::io::Error::other)?;
            out.write_all(&chunk).await?;
            written += chunk.len() as u64;
            progress.bar.inc(chunk.len() as u64);
        }
        if expected.is_some_and(|n| n != written) {
            return Err(std::io::Error::other(format!(
                "the server sent {written} of {} bytes",
                expected.unwrap_or_default()
            )));
        }
        out.flush().await?;
        let file = out.into_inner();
        file.set_permissions(std::fs::Permissions::from_mode(download.mode))
            .await?;
        drop(file);
        tokio::fs::rename(&partial, &download.local).await?;
        Ok(written)
    }
    .await;
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(anyhow!(e).context(format!(
                "downloading {remote} to {}",
                download.local.display()
            )));
        }
    };
    progress.file_done(1);
    Ok(json!({
        "source": remote.to_string(),
        "destination": download.local,
        "size": written,
    }))
}

/// Streams files of volumes to standard output, one after the other.
pub fn cat(client: &ApiClient, paths: &[RemotePath]) -> Result<()> {
    client.block_on(async {
        let mut stdout = std::io::stdout().lock();
        for path in paths {
            let response = Files::new(client, &path.volume)
                .download(&path.path)
                .await
                .with_context(|| path.to_string())?;
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.with_context(|| format!("reading {path}"))?;
                match stdout.write_all(&chunk) {
                    // The reader is gone (`| head`): nothing more to do.
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    other => other.context("writing to standard output")?,
                }
            }
        }
        match stdout.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
            other => other.context("writing to standard output"),
        }
    })
}
