//! `cellar umount`: unmounts a volume and waits until its daemon has flushed and exited.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Unmount a volume and wait until its data is flushed.
#[derive(Args, Debug)]
pub struct UmountArgs {
    /// Detach the mount even if files are open; the daemon flushes and exits when the last one
    /// is closed (no waiting)
    #[arg(short = 'l', long)]
    pub lazy: bool,
    /// With --lazy: still wait until the daemon has flushed and exited (after the last open
    /// file is closed), as a plain umount does
    #[arg(long, requires = "lazy")]
    pub wait: bool,
    /// How long to wait for the daemon to flush and exit
    #[arg(long, value_name = "DURATION", default_value = "10m", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Mounted directory
    #[arg(value_name = "MOUNTPOINT")]
    pub mount_point: PathBuf,
}

pub fn run(args: UmountArgs) -> Result<()> {
    // A mount whose daemon died cannot be canonicalized (ENOTCONN): use the path as given.
    let mount_point = args
        .mount_point
        .canonicalize()
        .or_else(|_| std::path::absolute(&args.mount_point))
        .context("mount point")?;
    let daemon = super::mount::daemon_pid(&mount_point)?;
    if let Err(e) = cellar_fuse::unmount(&mount_point, args.lazy) {
        let shown = args.mount_point.display();
        match e.raw_os_error() {
            Some(libc::EINVAL) => bail!("{shown} is not mounted"),
            Some(libc::ENOENT) => bail!("mount point {shown} does not exist"),
            Some(libc::EBUSY) => {
                bail!("{shown} is busy (files are open or a process runs in it); close them or use --lazy")
            }
            _ => return Err(e).with_context(|| format!("cannot unmount {shown}")),
        }
    }
    match daemon {
        Some(pid) if !args.lazy || args.wait => {
            wait_for_exit(pid, &mount_point, args.timeout)?;
            report_unflushed(&mount_point)
        }
        _ => Ok(()),
    }
}

/// Prints what the daemon could not flush (its report) and fails if there was any.
fn report_unflushed(mount_point: &Path) -> Result<()> {
    let report = super::mount::unflushed_report(mount_point);
    let Ok(text) = std::fs::read_to_string(&report) else {
        return Ok(());
    };
    let _ = std::fs::remove_file(&report);
    eprint!("{text}");
    bail!(
        "{} file(s) of {} could not be flushed (the object store failed, or the shutdown timeout passed)",
        text.lines().count(),
        mount_point.display()
    );
}

fn wait_for_exit(pid: u32, mount_point: &Path, timeout: Duration) -> Result<()> {
    let started = Instant::now();
    let spinner = super::spinner(format!("flushing {}", mount_point.display()));
    while is_running(pid) {
        if started.elapsed() > timeout {
            bail!(
                "the mount daemon (pid {pid}) of {} is still flushing after {}",
                mount_point.display(),
                humantime::format_duration(timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    spinner.finish_and_clear();
    Ok(())
}

/// Whether `pid` still runs (a zombie has flushed and exited: only its parent has not reaped it).
fn is_running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain ") ".
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z') | Some('X') | None)
}
