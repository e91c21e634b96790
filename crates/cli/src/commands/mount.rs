//! `cellar mount`: serves a volume on a directory until it is unmounted.
//!
//! In the background (the default) the process forks before doing anything else (no threads
//! exist yet, so forking is safe); the child opens the volume, mounts it and reports "mounted" or
//! the error through a pipe, and the parent exits only then: `cellar mount` returning 0 means the
//! mount is live. The daemon unmounts cleanly (flushing everything) on SIGTERM, SIGINT and SIGHUP,
//! and records its pid so that `cellar umount` can wait for the flush. The flush is bounded
//! (`--shutdown-timeout`): what the store does not take by then is kept in the spool directory,
//! listed in the log and in a report file that `cellar umount` prints, and replayed by the next
//! mount of the volume.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cellar_fuse::{MountHandle, MountOptions, Unmounter};
use cellar_metrics::{Endpoint, MetricsServer};
use cellar_vfs::{Unflushed, Vfs, VolumeConfig};
use clap::Args;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::VolumeArgs;

/// Mount a volume on a directory (in the background unless --foreground).
#[derive(Args, Debug)]
pub struct MountArgs {
    #[command(flatten)]
    pub volume: VolumeArgs,
    /// Stay in the foreground (log to stderr) instead of daemonizing
    #[arg(short, long)]
    pub foreground: bool,
    /// Mount read-only
    #[arg(long)]
    pub read_only: bool,
    /// Directory of the on-disk block cache (none by default)
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Budget of the on-disk block cache, MiB
    #[arg(long, value_name = "MIB", default_value_t = 10240)]
    pub cache_disk_mb: u64,
    /// Memory budget of the page cache and the read-ahead in flight, MiB (0: no cache)
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    pub cache_mem_mb: u64,
    /// Log file of a background mount [default: /var/log/cellar/VOLUME.log, or the temporary
    /// directory if that cannot be created]
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Threads serving kernel requests
    #[arg(long, value_name = "N", default_value_t = 16)]
    pub threads: usize,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (none by default)
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Serve Prometheus metrics over HTTP on a unix socket (GET /metrics; none by default)
    #[arg(long, value_name = "PATH")]
    pub metrics_socket: Option<PathBuf>,
    /// After an unmount (or SIGTERM), how long dirty files are flushed before the daemon gives
    /// up on the rest, keeps it in the spool directory and exits (one store operation under
    /// way may add --store-operation-timeout)
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Duration,
    /// Where writes that could not be flushed at unmount are kept until a later mount of the
    /// volume replays them [default: CACHE_DIR/spool with --cache-dir, else
    /// /var/lib/cellar/spool, or the temporary directory if that cannot be created]
    #[arg(long, value_name = "DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Directory to mount on (must exist)
    #[arg(value_name = "MOUNTPOINT")]
    pub mount_point: PathBuf,
}

pub fn run(args: MountArgs) -> Result<()> {
    return_freed_buffers_to_the_system();
    // Everything that can be checked cheaply is checked before forking, so that the common
    // mistakes fail right here with their own message.
    let mount_point = cellar_fuse::check_mount_point(&args.mount_point)?;
    cellar_fuse::check_fuse_device()?;
    let cache_dir = args
        .cache_dir
        .as_deref()
        .map(std::path::absolute)
        .transpose()
        .context("--cache-dir")?;
    let config = args.volume.config(
        mount_point.display().to_string(),
        args.cache_mem_mb << 20,
        cache_dir,
        args.cache_disk_mb << 20,
    )?;
    let mut options = MountOptions::new(&args.volume.volume);
    options.read_only = args.read_only;
    options.threads = args.threads;
    options.shutdown_timeout = args.shutdown_timeout;
    options.spool_dir = Some(match &args.spool_dir {
        Some(dir) => std::path::absolute(dir).context("--spool-dir")?,
        None => default_spool_dir(config.cache_dir.as_deref()),
    });
    let metrics: Vec<Endpoint> = args
        .metrics_addr
        .map(Endpoint::Tcp)
        .into_iter()
        .chain(
            args.metrics_socket
                .as_deref()
                .map(std::path::absolute)
                .transpose()
                .context("--metrics-socket")?
                .map(Endpoint::Unix),
        )
        .collect();

    if args.foreground {
        let daemon = start(config, &mount_point, &options, &metrics)?;
        return serve(daemon, || {});
    }
    let log_file = match &args.log_file {
        Some(path) => std::path::absolute(path).context("--log-file")?,
        None => default_log_file(&args.volume.volume),
    };
    daemonize(&log_file, || {
        start(config, &mount_point, &options, &metrics)
    })
}

/// A live mount and the metrics endpoints it serves (their socket files go with them).
struct Daemon {
    handle: MountHandle,
    _metrics: Vec<MetricsServer>,
}

/// Binds the metrics endpoints (in the daemon: a parent that exits must not remove their
/// socket files), then opens and mounts the volume.
fn start(
    config: VolumeConfig,
    mount_point: &Path,
    options: &MountOptions,
    metrics: &[Endpoint],
) -> Result<Daemon> {
    let metrics = metrics
        .iter()
        .map(|endpoint| {
            let server = MetricsServer::bind(endpoint)
                .with_context(|| format!("cannot serve metrics on {endpoint}"))?;
            server.spawn().context("starting the metrics thread")?;
            tracing::info!(endpoint = %server.endpoint(), "serving metrics");
            Ok(server)
        })
        .collect::<Result<Vec<_>>>()?;
    let volume = config.volume.clone();
    let vfs = Vfs::open_volume(config).with_context(|| format!("cannot open volume {volume}"))?;
    if let Some(spool) = &options.spool_dir {
        let replayed = vfs
            .replay_spool(spool)
            .with_context(|| format!("cannot replay the spooled writes of volume {volume}"))?;
        if !replayed.applied.is_empty() {
            tracing::info!(inodes = ?replayed.applied, "applied writes spooled by an earlier mount");
        }
        for conflict in &replayed.conflicts {
            tracing::warn!(path = %conflict.display(), "spooled writes kept aside, not applied");
        }
    }
    let mut options = options.clone();
    // A snapshot is read-only wherever it is mounted, whatever the caller asked.
    options.read_only |= vfs.is_snapshot();
    Ok(Daemon {
        handle: cellar_fuse::mount(vfs, mount_point, &options)?,
        _metrics: metrics,
    })
}

/// Serves until unmounted, then flushes. Signals unmount; the pid file lets `cellar umount`
/// wait for the end of the flush. `ready` runs once both are in place.
fn serve(Daemon { handle, _metrics }: Daemon, ready: impl FnOnce()) -> Result<()> {
    let report = unflushed_report(handle.mount_point());
    let pid_file = pid_file(handle.mount_point());
    if let Err(e) = write_pid_file(&pid_file) {
        tracing::warn!(
            "cannot record the daemon pid in {}: {e}",
            pid_file.display()
        );
    }
    unmount_on_signals(handle.unmounter())?;
    ready();
    let result = handle.wait();
    if let Ok(unflushed) = &result {
        report_unflushed(unflushed, &report);
    }
    let _ = std::fs::remove_file(&pid_file);
    let unflushed = result?;
    if !unflushed.is_empty() {
        bail!(
            "{} file(s) could not be flushed (see the log)",
            unflushed.len()
        );
    }
    Ok(())
}

/// Logs what could not be flushed and writes the report `cellar umount` prints (read before
/// the pid file goes, so that a waiting umount finds it).
fn report_unflushed(unflushed: &[Unflushed], report: &Path) {
    let _ = std::fs::remove_file(report);
    if unflushed.is_empty() {
        return;
    }
    let mut text = String::new();
    for file in unflushed {
        let line = match &file.spooled {
            Some(spool) => format!(
                "inode {}: {} bytes not flushed, kept in {} (a later mount of the volume retries them)\n",
                file.ino,
                file.bytes,
                spool.display()
            ),
            None => format!("inode {}: {} bytes not flushed and lost (could not spool them)\n", file.ino, file.bytes),
        };
        tracing::error!("{}", line.trim_end());
        text.push_str(&line);
    }
    if let Err(e) = std::fs::write(report, text) {
        tracing::warn!("cannot write the unflush report {}: {e}", report.display());
    }
}

fn unmount_on_signals(unmounter: Unmounter) -> Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("cellar-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                tracing::info!(signal, "unmounting on signal");
                match unmounter.unmount(false) {
                    Ok(()) => return,
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        // Still in use: detach it now; the session ends, and the data is
                        // flushed, once the last open file is closed.
                        tracing::warn!("mount point busy: detaching it lazily");
                        match unmounter.unmount(true) {
                            Ok(()) => return,
                            Err(e) => tracing::error!("lazy unmount failed: {e}"),
                        }
                    }
                    Err(e) => tracing::error!("unmount failed: {e}"),
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// Forks; the child runs `start`, reports through a pipe and then serves. The parent returns
/// when the child reported (Ok: mounted) or died.
fn daemonize(log_file: &Path, start: impl FnOnce() -> Result<Daemon>) -> Result<()> {
    let log = open_log(log_file)?;
    let (mut status_reader, mut status_writer) = status_pipe()?;
    // SAFETY: the process has a single thread here (nothing has spawned one yet), so the child
    // may run arbitrary code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("fork"),
        0 => {
            drop(status_reader);
            detach_from_terminal(&log)?;
            match start() {
                Ok(daemon) => serve(daemon, move || {
                    let _ = status_writer.write_all(b"ok");
                }),
                Err(error) => {
                    let _ = write!(status_writer, "{error:#}");
                    // The parent prints the error; the log keeps a copy.
                    tracing::error!("mount failed: {error:#}");
                    std::process::exit(1);
                }
            }
        }
        child => {
            drop(status_writer);
            let mut status = String::new();
            status_reader
                .read_to_string(&mut status)
                .context("reading the mount daemon's status")?;
            match status.as_str() {
                "ok" => {
                    tracing::debug!(pid = child, log = %log_file.display(), "mount daemon started");
                    Ok(())
                }
                "" => Err(anyhow!(
                    "the mount daemon exited before mounting; see {}",
                    log_file.display()
                )),
                error => Err(anyhow!("{error}")),
            }
        }
    }
}

fn status_pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("pipe");
    }
    // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(reader), File::from(writer)))
}

/// New session without a controlling terminal; stdin from /dev/null, stdout and stderr (and
/// so the logs) to the log file; cwd `/` so the daemon keeps no directory busy.
fn detach_from_terminal(log: &File) -> Result<()> {
    let null = File::open("/dev/null").context("/dev/null")?;
    // SAFETY: plain syscalls on descriptors this process owns.
    unsafe {
        libc::setsid();
        libc::dup2(null.as_raw_fd(), libc::STDIN_FILENO);
        libc::dup2(log.as_raw_fd(), libc::STDOUT_FILENO);
        libc::dup2(log.as_raw_fd(), libc::STDERR_FILENO);
    }
    std::env::set_current_dir("/").context("chdir /")?;
    Ok(())
}

fn open_log(path: &Path) -> Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the log directory {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open the log file {}", path.display()))
}

/// CACHE_DIR/spool, else /var/lib/cellar/spool, else under the temporary directory.
fn default_spool_dir(cache_dir: Option<&Path>) -> PathBuf {
    if let Some(cache) = cache_dir {
        return cache.join("spool");
    }
    let system_dir = Path::new("/var/lib/cellar/spool");
    if std::fs::create_dir_all(system_dir).is_ok() {
        system_dir.to_owned()
    } else {
        std::env::temp_dir().join("cellar-spool")
    }
}

fn default_log_file(volume: &str) -> PathBuf {
    let system_dir = Path::new("/var/log/cellar");
    let dir = if std::fs::create_dir_all(system_dir).is_ok() {
        system_dir.to_owned()
    } else {
        std::env::temp_dir()
    };
    dir.join(format!("{volume}.log"))
}

/// Where the daemon serving `mount_point` records its pid: one file per mount point under
/// /run/cellar (or the temporary directory without root).
pub fn pid_file(mount_point: &Path) -> PathBuf {
    let run_dir = Path::new("/run/cellar");
    let dir = if std::fs::create_dir_all(run_dir).is_ok() {
        run_dir.to_owned()
    } else {
        std::env::temp_dir().join("cellar-run")
    };
    // Percent-escaping keeps distinct mount points distinct ("/a_b" vs "/a/b").
    let escaped = mount_point
        .to_string_lossy()
        .replace('%', "%25")
        .replace('/', "%2F");
    dir.join(format!("mount-{escaped}.pid"))
}

/// Where the daemon of `mount_point` lists what it could not flush at unmount (beside its pid
/// file); `cellar umount` prints and removes it.
pub fn unflushed_report(mount_point: &Path) -> PathBuf {
    pid_file(mount_point).with_extension("unflushed")
}

/// Records "PID START_TIME": the start time tells this daemon apart from a later process that
/// got the same pid after a crash left the file behind.
fn write_pid_file(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let pid = std::process::id();
    let started = process_start_time(pid).unwrap_or_default();
    std::fs::write(path, format!("{pid} {started}"))
}

/// Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields resume after the parenthesised command name (which may contain spaces); the
    // state is field 3, so the start time is the 20th from there.
    let (_, fields) = stat.rsplit_once(") ")?;
    fields.split_whitespace().nth(19)?.parse().ok()
}

/// The pid recorded for `mount_point`, if that very process still runs.
pub fn daemon_pid(mount_point: &Path) -> Result<Option<u32>> {
    let recorded = match std::fs::read_to_string(pid_file(mount_point)) {
        Ok(text) => text,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("reading the pid file of {}: {e}", mount_point.display()),
    };
    let mut fields = recorded.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(pid)), Some(Ok(started))) = (fields.next(), fields.next()) else {
        return Ok(None);
    };
    let Ok(pid) = u32::try_from(pid) else {
        return Ok(None);
    };
    Ok((process_start_time(pid) == Some(started)).then_some(pid))
}

/// The daemon's memory budget counts cache pages (1 MiB each), and glibc's malloc would keep
/// freed ones in its arenas after raising its mmap threshold: a fixed threshold below the page
/// size maps every page buffer on its own and returns it to the system when freed, so the
/// resident size follows the cache instead of the allocator's high-water mark.
fn return_freed_buffers_to_the_system() {
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}
