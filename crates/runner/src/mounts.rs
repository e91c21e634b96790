//! The per-host mount manager: one FUSE mount per volume at `state_dir/mounts/<volume_id>`, served
//! by a `cellar mount` daemon, shared by every sandbox of the host that uses the volume. The set
//! of sandboxes using a volume is kept in `state_dir/mounts/<volume_id>.json`, so a restarted
//! runner knows which mounts to keep, to remount and to release.

use std::collections::{BTreeSet, HashSet};
use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::sandbox::SANDBOX_UID;
use crate::{RunnerError, VolumeSource};

/// How long `cellar mount` may take to bring a mount up (it returns once the mount is live).
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) struct Acquired {
    pub mount_point: PathBuf,
    /// The volume's previous mount had died and was replaced: running sandboxes need new binds.
    pub replaced_dead_mount: bool,
}

#[derive(Serialize, Deserialize)]
struct MountRecord {
    /// Kept (in a 0600 file) so that a dead daemon can be restarted after a runner restart.
    source: VolumeSource,
    /// Ids of the sandboxes using the mount.
    users: BTreeSet<String>,
}

pub(crate) struct MountManager {
    /// `state_dir/mounts`, absolute.
    dir: PathBuf,
    cellar_bin: PathBuf,
}

impl MountManager {
    pub(crate) fn new(dir: PathBuf, cellar_bin: PathBuf) -> MountManager {
        MountManager { dir, cellar_bin }
    }

    pub(crate) fn mount_point(&self, volume_id: &str) -> PathBuf {
        self.dir.join(volume_id)
    }

    /// Where the volume's mount daemon serves its metrics (HTTP `GET /metrics`, unix socket).
    fn metrics_socket(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.metrics.sock"))
    }

    fn record_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.json"))
    }

    fn load(&self, volume_id: &str) -> Result<Option<MountRecord>, RunnerError> {
        match std::fs::read(self.record_path(volume_id)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|err| {
                RunnerError::Io(std::io::Error::other(format!(
                    "corrupt mount record of volume {volume_id}: {err}"
                )))
            })?)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    fn save(&self, record: &MountRecord) -> Result<(), RunnerError> {
        let path = self.record_path(&record.source.volume_id);
        let tmp = path.with_extension("json.tmp");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        serde_json::to_writer(&mut file, record).map_err(std::io::Error::other)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Registers `sandbox_id` as a user of the volume, mounting it if it is not live, and
    /// returns the host mount point. Callers serialise acquire/release.
    pub(crate) fn acquire(
        &self,
        source: &VolumeSource,
        sandbox_id: &str,
    ) -> Result<Acquired, RunnerError> {
        let mut record = self.load(&source.volume_id)?.unwrap_or(MountRecord {
            source: source.clone(),
            users: BTreeSet::new(),
        });
        // The newest source wins (credentials may have been rotated).
        record.source = source.clone();
        record.users.insert(sandbox_id.to_owned());
        self.save(&record)?;
        match self.ensure_mounted(source) {
            Ok(replaced_dead_mount) => Ok(Acquired {
                mount_point: self.mount_point(&source.volume_id),
                replaced_dead_mount,
            }),
            Err(err) => {
                self.release(&source.volume_id, sandbox_id)?;
                Err(err)
            }
        }
    }

    /// Removes `sandbox_id` from the volume's users and unmounts the volume after its last user.
    pub(crate) fn release(&self, volume_id: &str, sandbox_id: &str) -> Result<(), RunnerError> {
        let Some(mut record) = self.load(volume_id)? else {
            return Ok(());
        };
        record.users.remove(sandbox_id);
        if !record.users.is_empty() {
            return self.save(&record);
        }
        self.unmount(volume_id)?;
        std::fs::remove_file(self.record_path(volume_id))?;
        Ok(())
    }

    /// After a restart: drops users that are no longer running sandboxes, unmounts volumes left
    /// without users and remounts those whose daemon died. Returns the remounted volumes.
    pub(crate) fn recover(&self, running: &HashSet<String>) -> Result<Vec<String>, RunnerError> {
        let mut remounted = Vec::new();
        for (volume_id, path) in self.recorded_volumes()? {
            let volume_id = volume_id.as_str();
            let Some(mut record) = self.load(volume_id)? else {
                continue;
            };
            let before = record.users.len();
            record.users.retain(|user| running.contains(user));
            if record.users.is_empty() {
                self.unmount(volume_id)?;
                std::fs::remove_file(&path)?;
                continue;
            }
            if record.users.len() != before {
                self.save(&record)?;
            }
            match self.ensure_mounted(&record.source) {
                Ok(true) => remounted.push(volume_id.to_owned()),
                Ok(false) => {}
                Err(err) => tracing::error!(volume_id, "cannot remount volume: {err}"),
            }
        }
        Ok(remounted)
    }

    /// Volumes in use whose mount is dead (its daemon died) or gone. Stats each mount point: the
    /// caller holds no lock that a hung mount could keep.
    pub(crate) fn broken_volumes(&self) -> Result<Vec<String>, RunnerError> {
        Ok(self
            .recorded_volumes()?
            .into_iter()
            .map(|(volume_id, _)| volume_id)
            .filter(|volume_id| mount_state(&self.mount_point(volume_id)) != MountState::Live)
            .collect())
    }

    /// The volumes that have a users record, with the record's path.
    fn recorded_volumes(&self) -> Result<Vec<(String, PathBuf)>, RunnerError> {
        let mut volumes = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().and_then(|ext| ext.to_str()) != Some("json") {
                continue;
            }
            if let Some(volume_id) = path.file_stem().and_then(|stem| stem.to_str()) {
                volumes.push((volume_id.to_owned(), path.clone()));
            }
        }
        Ok(volumes)
    }

    /// Mounts a volume in use again if its mount is still dead or gone; returns whether it did.
    /// Callers serialise this with acquire/release.
    pub(crate) fn remount(&self, volume_id: &str) -> Result<bool, RunnerError> {
        match self.load(volume_id)? {
            Some(record) if !record.users.is_empty() => {
                if mount_state(&self.mount_point(volume_id)) == MountState::Live {
                    return Ok(false);
                }
                self.ensure_mounted(&record.source)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Starts the mount daemon unless the mount is live; replaces a mount whose daemon died
    /// (and then returns true: the sandboxes' binds of the old mount are dead too).
    fn ensure_mounted(&self, source: &VolumeSource) -> Result<bool, RunnerError> {
        let mount_point = self.mount_point(&source.volume_id);
        let replaced_dead_mount = match mount_state(&mount_point) {
            MountState::Live => return Ok(false),
            MountState::Dead => {
                tracing::warn!(volume_id = %source.volume_id, "mount daemon died, remounting");
                self.unmount(&source.volume_id)?;
                true
            }
            MountState::Absent => false,
        };
        std::fs::create_dir_all(&mount_point)?;
        let log = self.log_file(&source.volume_id)?;
        let mut command = Command::new(&self.cellar_bin);
        command
            .arg("mount")
            .arg("--volume")
            .arg(&source.volume_name)
            .arg("--log-file")
            .arg(self.log_path(&source.volume_id));
        let metrics_socket = self.metrics_socket(&source.volume_id);
        // A unix socket's path has room for 107 bytes; a data directory too deep goes without.
        if metrics_socket.as_os_str().len() <= 107 {
            command.arg("--metrics-socket").arg(&metrics_socket);
        } else {
            tracing::warn!(path = %metrics_socket.display(), "path too long for a unix socket: the mount serves no metrics");
        }
        command
            .arg(&mount_point)
            // The daemon gets the store credentials and nothing of the runner's environment.
            // The URLs go through the environment too: they may hold a database password,
            // and a command line is readable by every host user.
            .env_clear()
            .env("PATH", crate::sandbox::SANDBOX_PATH)
            .env("CELLAR_META_URL", &source.meta_url)
            .env("CELLAR_STORE_URL", &source.store_url)
            .envs(source.store_env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let status = run_with_timeout(command, MOUNT_TIMEOUT)?;
        if !status.success() || mount_state(&mount_point) != MountState::Live {
            return Err(RunnerError::Unavailable(format!(
                "mounting volume {} failed ({status}); see {}",
                source.volume_id,
                self.log_path(&source.volume_id).display()
            )));
        }
        give_root_to_sandbox_user(&mount_point);
        Ok(replaced_dead_mount)
    }

    fn unmount(&self, volume_id: &str) -> Result<(), RunnerError> {
        let mount_point = self.mount_point(volume_id);
        if mount_state(&mount_point) == MountState::Absent {
            let _ = std::fs::remove_dir(&mount_point);
            return Ok(());
        }
        let umount = |flags: &[&str]| -> Result<_, RunnerError> {
            let mut command = Command::new(&self.cellar_bin);
            command
                .arg("umount")
                .args(flags)
                .arg(&mount_point)
                .env_clear()
                .env("PATH", crate::sandbox::SANDBOX_PATH)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(self.log_file(volume_id)?);
            Ok(run_with_timeout(command, UMOUNT_TIMEOUT))
        };
        let mut status = umount(&[])?;
        if mount_state(&mount_point) == MountState::Live {
            // Busy: a sandbox being torn down still holds it. Detach it and wait for its daemon
            // to flush and exit, so that the next mount of the volume here never meets it
            // (its pid file, its metrics socket).
            status = umount(&["--lazy", "--wait", "--timeout", "20s"])?;
        }
        if mount_state(&mount_point) != MountState::Absent {
            // The daemon is gone or stuck: detach the mount so the host never keeps a dead one.
            tracing::warn!(
                volume_id,
                ?status,
                "cellar umount failed, detaching the mount"
            );
            let path = CString::new(mount_point.as_os_str().as_bytes())
                .map_err(|err| RunnerError::InvalidInput(err.to_string()))?;
            // SAFETY: umount2 on a valid NUL-terminated path.
            if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
                return Err(std::io::Error::last_os_error().into());
            }
        }
        let _ = std::fs::remove_dir(&mount_point);
        Ok(())
    }

    fn log_path(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{volume_id}.log"))
    }

    fn log_file(&self, volume_id: &str) -> std::io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(self.log_path(volume_id))
    }
}

/// The volume root of a fresh volume belongs to root; the sandbox user must be able to write to
/// it, as in Daytona. Only a root-owned root is changed, so an owner set on purpose stays.
fn give_root_to_sandbox_user(mount_point: &Path) {
    match std::fs::metadata(mount_point) {
        Ok(meta) if meta.uid() == 0 => {
            if let Err(err) =
                std::os::unix::fs::chown(mount_point, Some(SANDBOX_UID), Some(SANDBOX_UID))
            {
                tracing::warn!(mount = %mount_point.display(), "cannot chown volume root: {err}");
            }
        }
        Ok(_) => {}
        Err(err) => {
            tracing::warn!(mount = %mount_point.display(), "cannot stat volume root: {err}")
        }
    }
}

fn run_with_timeout(
    mut command: Command,
    timeout: Duration,
) -> Result<std::process::ExitStatus, RunnerError> {
    let mut child = command.spawn().map_err(|err| {
        RunnerError::Unavailable(format!("cannot run {:?}: {err}", command.get_program()))
    })?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunnerError::Unavailable(format!(
                "{:?} timed out",
                command.get_program()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, PartialEq, Eq)]
enum MountState {
    /// A FUSE file system answers at the mount point.
    Live,
    /// Something is mounted there but does not answer (its daemon died).
    Dead,
    Absent,
}

fn mount_state(mount_point: &Path) -> MountState {
    // `mount_point` is absolute and free of symlinks (state_dir/mounts/<volume_id>).
    let mounted = cellar_fuse::is_mount_point(mount_point).unwrap_or_else(|err| {
        tracing::warn!(mount = %mount_point.display(), "cannot read the mount table: {err}");
        false
    });
    if !mounted {
        return MountState::Absent;
    }
    match std::fs::metadata(mount_point) {
        // Only a mount without its daemon answers ENOTCONN (ECONNABORTED once aborted); another
        // error (a busy metadata database) comes from a live daemon, whose mount must stay.
        Err(err)
            if matches!(
                err.raw_os_error(),
                Some(libc::ENOTCONN | libc::ECONNABORTED)
            ) =>
        {
            MountState::Dead
        }
        _ => MountState::Live,
    }
}

/// Opens (creating as needed, owned by the sandbox user) the directory `subpath` of a mounted
/// volume, one component at a time without following symlinks, so neither `..` nor a symlink
/// planted in the volume can lead outside it. The returned descriptor is what gets mounted.
pub(crate) fn open_volume_dir(
    mount_point: &Path,
    subpath: Option<&str>,
) -> Result<OwnedFd, RunnerError> {
    let mut dir = open_dir_at(libc::AT_FDCWD, mount_point.as_os_str().as_bytes())
        .map_err(|err| RunnerError::Unavailable(format!("volume mount not accessible: {err}")))?;
    for component in subpath.unwrap_or("").split('/') {
        match component {
            "" | "." => continue,
            ".." => {
                return Err(RunnerError::InvalidInput(format!(
                    "subpath must not contain '..': {}",
                    subpath.unwrap_or("")
                )))
            }
            _ => {}
        }
        let name = component.as_bytes();
        let cname = CString::new(name)
            .map_err(|_| RunnerError::InvalidInput("subpath contains NUL".to_owned()))?;
        let raw_dir = std::os::fd::AsRawFd::as_raw_fd(&dir);
        // SAFETY: mkdirat/fchownat with a valid directory fd and NUL-terminated name.
        let created = unsafe { libc::mkdirat(raw_dir, cname.as_ptr(), 0o755) } == 0;
        if !created {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(RunnerError::Io(err));
            }
        }
        let child = open_dir_at(raw_dir, name).map_err(|err| match err.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => RunnerError::InvalidInput(format!(
                "subpath component {component:?} is not a directory"
            )),
            _ => RunnerError::Io(err),
        })?;
        if created {
            let child_fd = std::os::fd::AsRawFd::as_raw_fd(&child);
            // SAFETY: fchown on a valid fd.
            if unsafe { libc::fchown(child_fd, SANDBOX_UID, SANDBOX_UID) } != 0 {
                tracing::warn!(
                    "cannot chown subpath directory: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        dir = child;
    }
    Ok(dir)
}

// Kernel ABI of the mount API (linux/mount.h), not exported by the libc crate.
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x4;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;
const MOUNT_ATTR_RDONLY: u64 = 0x1;
/// openat2(2)'s `RESOLVE_NO_SYMLINKS` (linux/openat2.h).
const RESOLVE_NO_SYMLINKS: u64 = 0x04;

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Replaces the bind at `mount_path` inside a running sandbox (whose init is `init_pid`) with a
/// fresh bind of `source`: used when a volume's dead mount was replaced, so that sandboxes
/// started before see the volume again.
pub(crate) fn replace_bind(
    init_pid: i32,
    source: &OwnedFd,
    mount_path: &str,
    read_only: bool,
) -> Result<(), RunnerError> {
    bind_into(init_pid, source, mount_path, read_only, BindMode::Replace)
}

/// Binds `source` at `mount_path` inside a running sandbox (hot attach), creating the mount
/// point's missing directories (owned by `owner`, mode 0755). The caller keeps a new bind from
/// overlapping the sandbox's other volume binds (its record of them).
pub(crate) fn attach_bind(
    init_pid: i32,
    source: &OwnedFd,
    mount_path: &str,
    read_only: bool,
    owner: u32,
) -> Result<(), RunnerError> {
    bind_into(
        init_pid,
        source,
        mount_path,
        read_only,
        BindMode::Create { owner },
    )
}

/// Removes the bind at `mount_path` inside a running sandbox (hot detach). Without `force`,
/// fails with `RunnerError::Busy` while a process of the sandbox uses it (an open file, a
/// working directory under it); with it, detaches it lazily (those processes keep what they
/// hold, nothing new reaches it).
pub(crate) fn detach_bind(init_pid: i32, mount_path: &str, force: bool) -> Result<(), RunnerError> {
    let at = SandboxPath::new(mount_path)?;
    let flags = libc::UMOUNT_NOFOLLOW | if force { libc::MNT_DETACH } else { 0 };
    let code = in_sandbox_namespace(init_pid, || {
        // SAFETY (forked child): system calls on NUL-terminated paths prepared before the fork.
        unsafe {
            let Some(dir) = at.open_parent() else {
                return 3;
            };
            if libc::fchdir(dir) != 0 {
                return 3;
            }
            if libc::umount2(at.name.as_ptr(), flags) == 0 {
                0
            } else if *libc::__errno_location() == libc::EBUSY {
                EXIT_BUSY
            } else {
                2
            }
        }
    })?;
    match code {
        0 => Ok(()),
        EXIT_BUSY => Err(RunnerError::Busy(format!(
            "{mount_path} is in use by a process of the sandbox (detach with force to cut it off)"
        ))),
        code => Err(RunnerError::Unavailable(format!(
            "cannot detach the volume at {mount_path} in sandbox (status {code})"
        ))),
    }
}

/// The exit code of a namespace child whose unmount found the mount busy.
const EXIT_BUSY: i32 = 16;

enum BindMode {
    /// Over the existing mount point (its old bind is detached first).
    Replace,
    /// At a new mount point, its missing directories made.
    Create { owner: u32 },
}

/// A path inside a sandbox, split for a forked child: the parent's components and the last name.
struct SandboxPath {
    components: Vec<CString>,
    name: CString,
}

impl SandboxPath {
    fn new(mount_path: &str) -> Result<SandboxPath, RunnerError> {
        let path = Path::new(mount_path);
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            return Err(RunnerError::InvalidInput(format!(
                "mount path {mount_path} has no parent"
            )));
        };
        let nul = |_| RunnerError::InvalidInput("mount path contains NUL".to_owned());
        let components = parent
            .components()
            .filter_map(|c| match c {
                std::path::Component::Normal(part) => Some(part),
                _ => None,
            })
            .map(|part| CString::new(part.as_bytes()).map_err(nul))
            .collect::<Result<_, _>>()?;
        Ok(SandboxPath {
            components,
            name: CString::new(name.as_bytes()).map_err(nul)?,
        })
    }

    /// Opens the parent from `/`, one component at a time, refusing every symlink (the
    /// sandbox's user may have replaced a directory with one since the sandbox started); with
    /// `create`, makes the missing ones. Async-signal-safe: for the forked child.
    unsafe fn walk_parent(&self, create: Option<u32>) -> Option<libc::c_int> {
        let how = OpenHow {
            flags: (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: RESOLVE_NO_SYMLINKS,
        };
        let open = |dir: libc::c_int, name: &CString| {
            libc::syscall(
                libc::SYS_openat2,
                dir,
                name.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            ) as libc::c_int
        };
        let mut dir = open(libc::AT_FDCWD, &CString::from(c"/"));
        for part in &self.components {
            if dir < 0 {
                return None;
            }
            if let Some(owner) = create {
                if libc::mkdirat(dir, part.as_ptr(), 0o755) == 0 {
                    libc::fchownat(dir, part.as_ptr(), owner, owner, libc::AT_SYMLINK_NOFOLLOW);
                }
            }
            let next = open(dir, part);
            libc::close(dir);
            dir = next;
        }
        (dir >= 0).then_some(dir)
    }

    unsafe fn open_parent(&self) -> Option<libc::c_int> {
        self.walk_parent(None)
    }
}

fn bind_into(
    init_pid: i32,
    source: &OwnedFd,
    mount_path: &str,
    read_only: bool,
    mode: BindMode,
) -> Result<(), RunnerError> {
    let tree = detached_tree(source, read_only)?;
    let tree_fd = std::os::fd::AsRawFd::as_raw_fd(&tree);
    let at = SandboxPath::new(mount_path)?;
    let empty = c"";
    let code = in_sandbox_namespace(init_pid, || {
        // SAFETY (forked child): system calls on valid fds and NUL-terminated paths prepared
        // before the fork, a correctly sized open_how.
        unsafe {
            let owner = match mode {
                BindMode::Create { owner } => Some(owner),
                BindMode::Replace => None,
            };
            let Some(dir) = at.walk_parent(owner) else {
                return 3;
            };
            match owner {
                Some(owner) => {
                    if libc::mkdirat(dir, at.name.as_ptr(), 0o755) == 0 {
                        libc::fchownat(
                            dir,
                            at.name.as_ptr(),
                            owner,
                            owner,
                            libc::AT_SYMLINK_NOFOLLOW,
                        );
                    }
                }
                None => {
                    libc::fchdir(dir);
                    libc::umount2(at.name.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW);
                }
            }
            let target = libc::openat(
                dir,
                at.name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            );
            if target < 0 {
                return 4;
            }
            let moved = libc::syscall(
                libc::SYS_move_mount,
                tree_fd,
                empty.as_ptr(),
                target,
                empty.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
            );
            if moved == 0 {
                0
            } else {
                2
            }
        }
    })?;
    if code != 0 {
        return Err(RunnerError::Unavailable(format!(
            "cannot bind the volume at {mount_path} in sandbox (status {code})"
        )));
    }
    Ok(())
}

/// A detached copy of `source`'s mount, made in the runner's namespace (read-only if asked).
fn detached_tree(source: &OwnedFd, read_only: bool) -> Result<OwnedFd, RunnerError> {
    let source_fd = std::os::fd::AsRawFd::as_raw_fd(source);
    let empty = c"";
    // SAFETY: open_tree with a valid fd and empty path (AT_EMPTY_PATH).
    let tree = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            source_fd,
            empty.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint,
        )
    };
    if tree < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: tree is a new fd owned by nobody else.
    let tree = unsafe { OwnedFd::from_raw_fd(tree as RawFd) };
    if read_only {
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        // SAFETY: mount_setattr on a valid mount fd with a correctly sized attribute struct.
        let set = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                std::os::fd::AsRawFd::as_raw_fd(&tree),
                empty.as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if set < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(tree)
}

/// Runs `child` in a forked child that joined the mount namespace of the sandbox whose init is
/// `init_pid`; returns its exit code. Joining another mount namespace needs a single-threaded
/// process, so `child` must use only async-signal-safe system calls on data prepared before.
fn in_sandbox_namespace(init_pid: i32, child: impl FnOnce() -> i32) -> Result<i32, RunnerError> {
    let namespace = std::fs::File::open(format!("/proc/{init_pid}/ns/mnt"))?;
    let namespace_fd = std::os::fd::AsRawFd::as_raw_fd(&namespace);
    // SAFETY: see above; the child ends with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if pid == 0 {
        // SAFETY: setns on a valid fd, then the caller's async-signal-safe code, then _exit.
        unsafe {
            if libc::setns(namespace_fd, libc::CLONE_NEWNS) != 0 {
                libc::_exit(1);
            }
            libc::_exit(child());
        }
    }
    let mut status = 0;
    // SAFETY: waitpid on our own child.
    if unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if !libc::WIFEXITED(status) {
        return Err(RunnerError::Unavailable(format!(
            "the sandbox namespace helper died (status {status})"
        )));
    }
    Ok(libc::WEXITSTATUS(status))
}

fn open_dir_at(dir: RawFd, name: &[u8]) -> std::io::Result<OwnedFd> {
    let name = CString::new(name).map_err(std::io::Error::other)?;
    // SAFETY: openat with a valid directory fd (or AT_FDCWD) and NUL-terminated name.
    let fd = unsafe {
        libc::openat(
            dir,
            name.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_state_of_a_mount_point_with_a_space_and_of_a_plain_directory() {
        assert_eq!(mount_state(Path::new("/")), MountState::Live);
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().canonicalize().unwrap().join("a b");
        std::fs::create_dir(&spaced).unwrap();
        assert_eq!(mount_state(&spaced), MountState::Absent);
    }

    #[test]
    fn subpath_cannot_leave_the_volume() {
        let volume = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", volume.path().join("root")).unwrap();
        assert!(matches!(
            open_volume_dir(volume.path(), Some("a/../../etc")),
            Err(RunnerError::InvalidInput(_))
        ));
        assert!(matches!(
            open_volume_dir(volume.path(), Some("root/etc")),
            Err(RunnerError::InvalidInput(_))
        ));
        open_volume_dir(volume.path(), Some("a/b")).unwrap();
        assert!(volume.path().join("a/b").is_dir());
    }
}
