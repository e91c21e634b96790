//! Mounting, waiting for and unmounting a volume.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use cellar_vfs::{Invalidation, Unflushed, Vfs, ROOT_INO};
use fuser::{BackgroundSession, Config, INodeNo, MountOption, Notifier, Session, SessionACL};

use crate::fs::CellarFs;
use crate::kernel_cache::KernelCache;

const FUSE_DEVICE: &str = "/dev/fuse";
/// Kernel read-ahead of the mount. FUSE starts every mount at 128 KiB; larger read-ahead turns
/// sequential reads into fewer, larger (1 MiB) requests.
const READ_AHEAD_KIB: u32 = 1024;

/// How a volume is mounted.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Volume name; the mount shows as `cellar:<volume>` of type `fuse.cellar` in /proc/mounts.
    pub volume: String,
    pub read_only: bool,
    /// Let users other than the mounting one in (sandboxes run as other users); the kernel
    /// still checks permissions (`default_permissions`).
    pub allow_other: bool,
    /// Threads serving kernel requests, each on its own cloned /dev/fuse descriptor.
    pub threads: usize,
    /// After unmounting, files are flushed for this long; what is still dirty then is kept in
    /// `spool_dir` (or lost without one) and reported.
    pub shutdown_timeout: Duration,
    pub spool_dir: Option<PathBuf>,
}

impl MountOptions {
    pub fn new(volume: &str) -> Self {
        MountOptions {
            volume: volume.to_owned(),
            read_only: false,
            allow_other: true,
            threads: 16,
            shutdown_timeout: Duration::from_secs(60),
            spool_dir: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("mount point {0} does not exist")]
    MissingMountPoint(PathBuf),
    #[error("mount point {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("mount point {0} is already mounted")]
    AlreadyMounted(PathBuf),
    #[error(
        "mount point {0} is a dead mount (its daemon exited): unmount it first (cellar umount {0})"
    )]
    DeadMount(PathBuf),
    #[error("mount point {path}: {source}")]
    BadMountPoint { path: PathBuf, source: io::Error },
    #[error(
        "/dev/fuse is missing: load the fuse module or run the container with --device /dev/fuse"
    )]
    NoFuseDevice,
    #[error("cannot mount on {path}: {source}")]
    Mount { path: PathBuf, source: io::Error },
    #[error("the FUSE session of {path} failed: {source}")]
    Session { path: PathBuf, source: io::Error },
    #[error("flushing the volume after unmounting {path} failed: {message}")]
    Flush { path: PathBuf, message: String },
}

/// Checks that `path` can be mounted on: an existing directory that is not a mount point already.
/// Returns its canonical path.
pub fn check_mount_point(path: &Path) -> Result<PathBuf, MountError> {
    let bad = |source: io::Error| MountError::BadMountPoint {
        path: path.to_owned(),
        source,
    };
    let canonical = match path.canonicalize() {
        Ok(canonical) => canonical,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(MountError::MissingMountPoint(path.to_owned()))
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::DeadMount(path.to_owned()))
        }
        Err(e) => return Err(bad(e)),
    };
    match std::fs::metadata(&canonical) {
        Ok(meta) if !meta.is_dir() => return Err(MountError::NotADirectory(path.to_owned())),
        Ok(_) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(MountError::DeadMount(path.to_owned()))
        }
        Err(e) => return Err(bad(e)),
    }
    if is_mount_point(&canonical).map_err(bad)? {
        return Err(MountError::AlreadyMounted(path.to_owned()));
    }
    Ok(canonical)
}

/// Whether a canonical path is a mount point of this mount namespace (the runner asks it too).
pub fn is_mount_point(canonical: &Path) -> io::Result<bool> {
    let mountinfo = std::fs::read("/proc/self/mountinfo")?;
    let wanted = canonical.as_os_str().as_bytes();
    Ok(mountinfo
        .split(|&b| b == b'\n')
        .filter_map(|line| line.split(|&b| b == b' ').nth(4))
        .any(|mount_point| unescape_mountinfo(mount_point) == wanted))
}

/// Undoes the octal escapes (`\040` for a space, ...) of /proc/self/mountinfo paths.
fn unescape_mountinfo(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|digits| field[i] == b'\\' && digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match octal {
            Some(digits) => {
                out.push(
                    digits
                        .iter()
                        .fold(0u8, |acc, d| acc.wrapping_mul(8) + (d - b'0')),
                );
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// Fails with [`MountError::NoFuseDevice`] when the kernel's FUSE device is not available.
pub fn check_fuse_device() -> Result<(), MountError> {
    if Path::new(FUSE_DEVICE).exists() {
        Ok(())
    } else {
        Err(MountError::NoFuseDevice)
    }
}

/// A mounted volume. Call [`MountHandle::wait`] (or [`MountHandle::unmount`]) to end it: that is
/// where the vfs is flushed and its session closed.
pub struct MountHandle {
    session: BackgroundSession,
    vfs: Arc<Vfs>,
    mount_point: PathBuf,
    shutdown_timeout: Duration,
    spool_dir: Option<PathBuf>,
}

/// Unmounts a mount from any thread (for example a signal handler thread).
#[derive(Clone, Debug)]
pub struct Unmounter {
    mount_point: PathBuf,
}

impl Unmounter {
    pub fn unmount(&self, lazy: bool) -> io::Result<()> {
        unmount(&self.mount_point, lazy)
    }
}

/// Mounts `vfs` on `mount_point` and serves it on background threads.
pub fn mount(
    vfs: Arc<Vfs>,
    mount_point: &Path,
    options: &MountOptions,
) -> Result<MountHandle, MountError> {
    let mount_point = check_mount_point(mount_point)?;
    check_fuse_device()?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("cellar:{}", options.volume)),
        // Passed to the kernel directly (fuser's Subtype only reaches fusermount).
        MountOption::CUSTOM("subtype=cellar".into()),
        MountOption::DefaultPermissions,
        // A volume's files belong to its tenants: their setuid bits and device nodes grant
        // nothing on the host either.
        MountOption::NoSuid,
        MountOption::NoDev,
        if options.read_only {
            MountOption::RO
        } else {
            MountOption::RW
        },
    ];
    // No auto_unmount: it needs a fusermount helper process per mount, and a daemon that dies
    // leaves a mount that fails with ENOTCONN, which `cellar umount` clears.
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    config.clone_fd = true;

    let kernel = Arc::new(KernelCache::new(crate::fs::TTL));
    let notifier = Arc::new(OnceLock::new());
    let fs = CellarFs::new(Arc::clone(&vfs), Arc::clone(&kernel), Arc::clone(&notifier));
    let session = Session::new(fs, &mount_point, &config).map_err(|source| MountError::Mount {
        path: mount_point.clone(),
        source,
    })?;
    let _ = notifier.set(session.notifier());
    forward_invalidations(&vfs, session.notifier(), kernel);
    let session = session.spawn().map_err(|source| MountError::Session {
        path: mount_point.clone(),
        source,
    })?;
    if let Err(e) = raise_read_ahead(&mount_point) {
        tracing::debug!("kernel read-ahead left at its default: {e}");
    }
    tracing::info!(mount_point = %mount_point.display(), volume = %options.volume, "mounted");
    Ok(MountHandle {
        session,
        vfs,
        mount_point,
        shutdown_timeout: options.shutdown_timeout,
        spool_dir: options.spool_dir.clone(),
    })
}

/// Raises the read-ahead of the mount's backing device info (writable by root only).
fn raise_read_ahead(mount_point: &Path) -> io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let device = std::fs::metadata(mount_point)?.dev();
    let setting = format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        libc::major(device),
        libc::minor(device)
    );
    std::fs::write(setting, READ_AHEAD_KIB.to_string())
}

/// Sends the vfs's invalidations to the kernel from a thread of their own: a notification can
/// wait for locks the kernel holds while one of our request handlers is running.
fn forward_invalidations(vfs: &Vfs, notifier: Notifier, kernel: Arc<KernelCache>) {
    let (sender, receiver) = mpsc::channel::<Invalidation>();
    vfs.set_invalidator(Box::new(move |invalidation| {
        // The receiver is gone only after unmount, when there is nothing left to invalidate.
        let _ = sender.send(invalidation);
    }));
    let spawned = std::thread::Builder::new()
        .name("cellar-invalidate".into())
        .spawn(move || {
            for invalidation in receiver {
                match invalidation {
                    Invalidation::Inode(ino) => {
                        kernel.xattrs_changed(Some(ino));
                        report_invalidation(notifier.inval_inode(INodeNo(ino), 0, 0))
                    }
                    Invalidation::Entry { parent, name } => report_invalidation(
                        notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)),
                    ),
                    Invalidation::All => {
                        kernel.xattrs_changed(None);
                        let held = kernel.held();
                        tracing::info!(entries = held.len(), "dropping every kernel cache entry");
                        for (ino, parent, name) in held {
                            report_invalidation(
                                notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)),
                            );
                            report_invalidation(notifier.inval_inode(INodeNo(ino), 0, 0));
                        }
                        for (parent, name) in kernel.held_missing() {
                            report_invalidation(
                                notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(&name)),
                            );
                        }
                        report_invalidation(notifier.inval_inode(INodeNo(ROOT_INO), 0, 0));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(
            "no cache invalidation thread ({e}): other mounts' changes show only after the TTL"
        );
    }
}

pub(crate) fn report_invalidation(result: io::Result<()>) {
    // ENOENT: the kernel does not cache that inode or entry; nothing to do.
    if let Err(e) = result {
        if e.raw_os_error() != Some(libc::ENOENT) {
            tracing::debug!("kernel cache invalidation failed: {e}");
        }
    }
}

impl MountHandle {
    pub fn mount_point(&self) -> &Path {
        &self.mount_point
    }

    pub fn unmounter(&self) -> Unmounter {
        Unmounter {
            mount_point: self.mount_point.clone(),
        }
    }

    /// Waits until the file system is unmounted (by `umount`, an [`Unmounter`] or
    /// `fusermount3 -u`), then flushes the vfs (within the shutdown timeout) and closes its
    /// session. Returns what could not be flushed (kept in the spool directory, if any).
    pub fn wait(self) -> Result<Vec<Unflushed>, MountError> {
        let served = self.session.join();
        // Drops the invalidation sender, which ends the invalidation thread.
        self.vfs.set_invalidator(Box::new(|_| {}));
        let flushed = self
            .vfs
            .shutdown_within(self.shutdown_timeout, self.spool_dir.as_deref());
        tracing::info!(mount_point = %self.mount_point.display(), "unmounted");
        served.map_err(|source| MountError::Session {
            path: self.mount_point.clone(),
            source,
        })?;
        flushed.map_err(|e| MountError::Flush {
            path: self.mount_point.clone(),
            message: format!("{e:#}"),
        })
    }

    /// Unmounts (failing with EBUSY while files are open) and waits as [`MountHandle::wait`].
    pub fn unmount(self) -> Result<Vec<Unflushed>, MountError> {
        self.unmounter()
            .unmount(false)
            .map_err(|source| MountError::Session {
                path: self.mount_point.clone(),
                source,
            })?;
        self.wait()
    }
}

/// Unmounts a FUSE mount: umount2(2) as root, `fusermount3 -u` for the user who mounted it.
/// `lazy` detaches it now even if busy; the daemon ends when the last file is closed.
pub fn unmount(mount_point: &Path, lazy: bool) -> io::Result<()> {
    let path = CString::new(mount_point.as_os_str().as_bytes())?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
    if unsafe { libc::umount2(path.as_ptr(), flags) } == 0 {
        return Ok(());
    }
    let error = io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EPERM) {
        return Err(error);
    }
    let mut fusermount = Command::new("fusermount3");
    fusermount.arg("-u").arg("-q");
    if lazy {
        fusermount.arg("-z");
    }
    let output = fusermount.arg(mount_point).output()?;
    if output.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo(br"/mnt/a\040b"), b"/mnt/a b");
        assert_eq!(unescape_mountinfo(br"/x\134y"), br"/x\y");
        assert_eq!(unescape_mountinfo(br"/plain\0"), br"/plain\0");
        assert_eq!(unescape_mountinfo(b"/plain"), b"/plain");
        // An escape that ends the field, and a tab and a newline.
        assert_eq!(unescape_mountinfo(br"/end\040"), b"/end ");
        assert_eq!(unescape_mountinfo(br"/t\011n\012"), b"/t\tn\n");
        // Not escapes: too few digits, or not octal.
        assert_eq!(unescape_mountinfo(br"/a\04"), br"/a\04");
        assert_eq!(unescape_mountinfo(br"/a\089"), br"/a\089");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mount_point(Path::new("/")).unwrap());
        let dir = std::env::temp_dir().join(format!("cellar-fuse-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let canonical = dir.canonicalize().unwrap();
        assert!(!is_mount_point(&canonical).unwrap());
        assert_eq!(check_mount_point(&dir).unwrap(), canonical);
        std::fs::remove_dir(&dir).unwrap();
        assert!(matches!(
            check_mount_point(&dir),
            Err(MountError::MissingMountPoint(_))
        ));
    }
}
