//! Starting and stopping one sandbox: a bubblewrap process tree detached from the runner (so it
//! survives a runner restart), described by a JSON record in `state_dir/sandboxes/<id>.json`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;

use crate::{network, process, seccomp, NetworkPolicy, RunnerError};

/// The unprivileged user every sandbox process runs as.
pub(crate) const SANDBOX_UID: u32 = 1000;
pub(crate) const SANDBOX_USER: &str = "daytona";
pub(crate) const SANDBOX_HOME: &str = "/home/daytona";
pub(crate) const SANDBOX_PATH: &str =
    "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Host directories below the snapshot's /etc that are hidden from sandboxes.
const HOST_PRIVATE_DIRS: &[&str] = &["/etc/cellar"];

/// How long bubblewrap may take to set a sandbox up.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a killed sandbox may take to disappear.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// `setpriv` options that strip every capability for good, also through setuid binaries of the
/// host's /usr: empty bounding and inheritable sets, no new privileges.
const DROP_CAPABILITIES: [&str; 3] = ["--no-new-privs", "--bounding-set=-all", "--inh-caps=-all"];

/// The `setpriv` invocation that turns root into the sandbox user: no groups, no capabilities.
pub(crate) fn become_sandbox_user_args() -> Vec<String> {
    let mut args = vec![
        "setpriv".to_owned(),
        format!("--reuid={SANDBOX_UID}"),
        format!("--regid={SANDBOX_UID}"),
        "--clear-groups".to_owned(),
    ];
    args.extend(DROP_CAPABILITIES.map(str::to_owned));
    args
}

/// What the runner remembers about a started sandbox, across restarts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SandboxRecord {
    pub id: String,
    /// The outer bubblewrap process (host PID namespace).
    pub bwrap_pid: i32,
    /// PID 1 of the sandbox's PID namespace, as seen from the host: the target of `nsenter`.
    pub init_pid: i32,
    /// Start time of `init_pid`, so that a reused pid is never mistaken for the sandbox.
    pub init_start_time: u64,
    /// The sandbox's environment, applied to every exec.
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeBindRecord>,
    /// Records of runners before sandboxes had their own network namespace lack it.
    #[serde(default = "isolated")]
    pub network: NetworkPolicy,
}

fn isolated() -> NetworkPolicy {
    NetworkPolicy::Isolated
}

/// A volume bind of a sandbox, remembered so that it can be renewed if the volume's mount is
/// replaced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct VolumeBindRecord {
    pub volume_id: String,
    pub mount_path: String,
    pub subpath: Option<String>,
    pub read_only: bool,
}

impl SandboxRecord {
    /// The volumes the sandbox uses, each once.
    pub(crate) fn volume_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.volumes.iter().map(|v| v.volume_id.clone()).collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// True while the sandbox's init process is the one we started and still runs.
    pub(crate) fn is_alive(&self) -> bool {
        process::start_time(self.init_pid) == Some(self.init_start_time)
            && process::program_name(self.init_pid).as_deref() == Some("bwrap")
    }

    /// Kills every process of the sandbox (PID 1 of a namespace takes all others with it) and
    /// waits until they are gone.
    pub(crate) async fn kill(&self) -> Result<(), RunnerError> {
        if !self.is_alive() {
            return Ok(());
        }
        process::kill(self.init_pid, libc::SIGKILL);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while self.is_alive() {
            if Instant::now() > deadline {
                return Err(RunnerError::Unavailable(format!(
                    "sandbox {} did not stop after SIGKILL",
                    self.id
                )));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

/// Files and directories of one sandbox on the host.
pub(crate) struct SandboxPaths {
    /// `state_dir/sandboxes/<id>`: home, tmp, passwd, group, bwrap.log.
    pub dir: PathBuf,
    /// `state_dir/sandboxes/<id>.json`
    pub record: PathBuf,
    /// `state_dir/sandboxes/<id>.netns`: the bind mount of an outbound sandbox's network
    /// namespace that pasta joins.
    pub netns: PathBuf,
}

impl SandboxPaths {
    pub(crate) fn new(sandboxes_dir: &Path, id: &str) -> SandboxPaths {
        SandboxPaths {
            dir: sandboxes_dir.join(id),
            record: sandboxes_dir.join(format!("{id}.json")),
            netns: sandboxes_dir.join(format!("{id}.netns")),
        }
    }

    pub(crate) fn home(&self) -> PathBuf {
        self.dir.join("home")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("bwrap.log")
    }

    pub(crate) fn network_log(&self) -> PathBuf {
        self.dir.join("pasta.log")
    }

    /// Removes everything the sandbox left on the host (its home included).
    pub(crate) fn remove(&self) {
        network::disconnect(&self.netns);
        for result in [
            std::fs::remove_dir_all(&self.dir),
            std::fs::remove_file(&self.record),
        ] {
            if let Err(err) = result {
                if err.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %self.dir.display(), "cannot remove sandbox files: {err}");
                }
            }
        }
    }
}

/// A volume directory (already opened on the host, so that nothing can swap it for a symlink
/// before bubblewrap mounts it) and where it appears in the sandbox.
pub(crate) struct VolumeBind {
    pub source: OwnedFd,
    pub mount_path: String,
    pub read_only: bool,
}

pub(crate) struct Launch<'a> {
    pub id: &'a str,
    pub env: &'a BTreeMap<String, String>,
    pub binds: &'a [VolumeBind],
    /// The network namespace to run in; None: a new one with only loopback.
    pub netns: Option<&'a OwnedFd>,
    pub cgroup_procs: Vec<CString>,
}

/// The pids of a started sandbox.
pub(crate) struct Started {
    pub bwrap_pid: i32,
    pub init_pid: i32,
    pub init_start_time: u64,
}

/// Prepares the sandbox's private directories: a fresh home owned by the sandbox user, a private
/// /tmp, and passwd/group files that know the sandbox user.
pub(crate) fn prepare_dirs(paths: &SandboxPaths, binds: &[VolumeBind]) -> std::io::Result<()> {
    std::fs::create_dir_all(paths.home())?;
    chown(paths.home(), Some(SANDBOX_UID), Some(SANDBOX_UID))?;
    std::fs::set_permissions(paths.home(), std::fs::Permissions::from_mode(0o755))?;
    let tmp = paths.dir.join("tmp");
    std::fs::create_dir_all(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))?;
    // Mount points below the home belong to the user, as if they had created them.
    for bind in binds {
        if let Some(relative) = Path::new(&bind.mount_path)
            .strip_prefix(SANDBOX_HOME)
            .ok()
            .and_then(Path::parent)
        {
            let mut dir = paths.home();
            for component in relative.components() {
                dir.push(component);
                if !dir.exists() {
                    std::fs::create_dir(&dir)?;
                    chown(&dir, Some(SANDBOX_UID), Some(SANDBOX_UID))?;
                }
            }
        }
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    std::fs::write(
        paths.dir.join("passwd"),
        with_sandbox_user(
            &passwd,
            &format!(
                "{SANDBOX_USER}:x:{SANDBOX_UID}:{SANDBOX_UID}:Daytona:{SANDBOX_HOME}:/bin/bash"
            ),
        ),
    )?;
    let group = std::fs::read_to_string("/etc/group").unwrap_or_default();
    std::fs::write(
        paths.dir.join("group"),
        with_sandbox_user(&group, &format!("{SANDBOX_USER}:x:{SANDBOX_UID}:")),
    )?;
    Ok(())
}

/// A passwd or group file with any entry for the sandbox user's name or id replaced by `entry`.
fn with_sandbox_user(file: &str, entry: &str) -> String {
    let uid = SANDBOX_UID.to_string();
    let mut out: String = file
        .lines()
        .filter(|line| {
            let mut fields = line.split(':');
            let name = fields.next();
            let id = fields.nth(1);
            name != Some(SANDBOX_USER) && id != Some(uid.as_str())
        })
        .map(|line| format!("{line}\n"))
        .collect();
    out.push_str(entry);
    out.push('\n');
    out
}

/// The bubblewrap arguments of a sandbox; `status_fd` receives bubblewrap's JSON status,
/// `seccomp_fds` hold the seccomp filters of its processes.
fn bwrap_args(
    launch: &Launch<'_>,
    paths: &SandboxPaths,
    status_fd: RawFd,
    seccomp_fds: &[RawFd],
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|item| item.to_string()));
    for fd in seccomp_fds {
        push(&["--add-seccomp-fd", &fd.to_string()]);
    }
    push(&["--unshare-pid", "--unshare-ipc", "--unshare-uts"]);
    // Always a network namespace of its own: an outbound one is made beforehand (network.rs)
    // and entered before bubblewrap runs.
    if launch.netns.is_none() {
        push(&["--unshare-net"]);
    }
    let hostname: String = launch.id.chars().take(12).collect();
    push(&["--hostname", &hostname]);
    push(&["--clearenv"]);
    push(&["--setenv", "HOME", SANDBOX_HOME]);
    push(&["--setenv", "PATH", SANDBOX_PATH]);
    push(&["--setenv", "USER", SANDBOX_USER]);
    for (key, value) in launch.env {
        push(&["--setenv", key, value]);
    }
    push(&["--json-status-fd", &status_fd.to_string()]);
    // The snapshot: the host's system directories, read-only (merged-/usr links stay links).
    push(&["--ro-bind", "/usr", "/usr"]);
    for dir in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        match std::fs::read_link(dir) {
            Ok(target) => push(&["--symlink", &target.to_string_lossy(), dir]),
            Err(_) if Path::new(dir).is_dir() => push(&["--ro-bind", dir, dir]),
            Err(_) => {}
        }
    }
    push(&["--ro-bind", "/etc", "/etc"]);
    // Cellar's own configuration (database and store credentials) stays on the host.
    for private in HOST_PRIVATE_DIRS {
        if Path::new(private).is_dir() {
            push(&["--tmpfs", private]);
        }
    }
    let passwd = paths.dir.join("passwd");
    let group = paths.dir.join("group");
    push(&["--ro-bind", &passwd.to_string_lossy(), "/etc/passwd"]);
    push(&["--ro-bind", &group.to_string_lossy(), "/etc/group"]);
    push(&["--proc", "/proc", "--dev", "/dev"]);
    // bubblewrap would create missing parents with the mode of the source's parent (0700 for
    // the runner's private state), locking the user out: create them explicitly.
    push(&["--perms", "0755", "--dir", "/home"]);
    push(&["--bind", &paths.home().to_string_lossy(), SANDBOX_HOME]);
    push(&["--bind", &paths.dir.join("tmp").to_string_lossy(), "/tmp"]);
    // Parents before children, should mount paths nest.
    let mut binds: Vec<&VolumeBind> = launch.binds.iter().collect();
    binds.sort_by_key(|bind| Path::new(&bind.mount_path).components().count());
    for bind in binds {
        // Parents below the home already exist (see prepare_dirs), owned by the user.
        let mount_path = Path::new(&bind.mount_path);
        let mut parents: Vec<&Path> = mount_path
            .ancestors()
            .skip(1)
            .take_while(|dir| !dir.starts_with(SANDBOX_HOME) && *dir != Path::new("/"))
            .collect();
        parents.reverse();
        for parent in parents {
            push(&["--perms", "0755", "--dir", &parent.to_string_lossy()]);
        }
        let kind = if bind.read_only {
            "--ro-bind"
        } else {
            "--bind"
        };
        // bubblewrap inherits the descriptor; the magic link names the opened directory itself.
        let source = format!("/proc/self/fd/{}", bind.source.as_raw_fd());
        push(&[kind, &source, &bind.mount_path]);
    }
    // The init keeps the namespaces alive. It runs as root without any capability rather than
    // as the sandbox user, so that the user's `kill -9 -1` cannot end the whole sandbox.
    push(&["--chdir", SANDBOX_HOME, "--", "setpriv"]);
    push(&DROP_CAPABILITIES);
    push(&["sleep", "infinity"]);
    args
}

/// Starts the sandbox and returns once its init process runs.
pub(crate) async fn launch(
    launch: Launch<'_>,
    paths: &SandboxPaths,
) -> Result<Started, RunnerError> {
    let bwrap = process::find_program("bwrap").ok_or_else(|| {
        RunnerError::Unavailable("bubblewrap (bwrap) is not installed".to_owned())
    })?;
    let (status_reader, status_writer) = std::io::pipe()?;
    let status_fd = status_writer.as_raw_fd();
    let seccomp = seccomp::filters()?.memfds()?;
    let seccomp_fds: Vec<RawFd> = seccomp.iter().map(AsRawFd::as_raw_fd).collect();
    let inherited_fds: Vec<RawFd> = launch
        .binds
        .iter()
        .map(|bind| bind.source.as_raw_fd())
        .chain([status_fd])
        .chain(seccomp_fds.iter().copied())
        .collect();
    let log = std::fs::File::create(paths.log())?;
    let mut command = tokio::process::Command::new(bwrap);
    command
        .args(bwrap_args(&launch, paths, status_fd, &seccomp_fds))
        .env_clear()
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    let cgroup_procs = launch.cgroup_procs;
    let netns = launch.netns.map(AsRawFd::as_raw_fd);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setns, setsid, open/write/close, fcntl) on data prepared before the fork.
    unsafe {
        command.pre_exec(move || {
            if let Some(netns) = netns {
                if libc::setns(netns, libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Detached from the runner: its own session, so it outlives a runner restart.
            libc::setsid();
            crate::cgroup::join_self(&cgroup_procs);
            for fd in &inherited_fds {
                libc::fcntl(*fd, libc::F_SETFD, 0);
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    drop(command);
    drop(status_writer);
    drop(seccomp);
    let bwrap_pid = child.id().map(|pid| pid as i32).unwrap_or_default();

    let started = wait_started(&mut child, status_reader, paths).await;
    if started.is_err() {
        let _ = child.start_kill();
    }
    // Reap bubblewrap whenever it exits, as long as this runner lives.
    tokio::spawn(async move {
        let _ = child.wait().await;
    });
    let (init_pid, init_start_time) = started?;
    Ok(Started {
        bwrap_pid,
        init_pid,
        init_start_time,
    })
}

/// Waits for bubblewrap to report the sandbox's init pid and for the init to have exec'ed its
/// program (so all mounts are in place); on failure returns bubblewrap's own message.
async fn wait_started(
    child: &mut tokio::process::Child,
    status_reader: std::io::PipeReader,
    paths: &SandboxPaths,
) -> Result<(i32, u64), RunnerError> {
    let failure = |what: &str| {
        let log = std::fs::read_to_string(paths.log()).unwrap_or_default();
        RunnerError::Unavailable(format!("sandbox did not start ({what}): {}", log.trim()))
    };
    let read_status = async {
        let mut status =
            tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(status_reader))?;
        let mut text = Vec::new();
        let mut buf = [0u8; 512];
        loop {
            let n = status.read(&mut buf).await?;
            if n == 0 {
                return Ok::<_, std::io::Error>(None);
            }
            text.extend_from_slice(&buf[..n]);
            if let Some(pid) = parse_child_pid(&text) {
                return Ok(Some(pid));
            }
        }
    };
    let init_pid = match tokio::time::timeout(START_TIMEOUT, read_status).await {
        Ok(Ok(Some(pid))) => pid,
        Ok(Ok(None)) => return Err(failure("bubblewrap exited")),
        Ok(Err(err)) => return Err(err.into()),
        Err(_) => return Err(failure("timeout")),
    };
    let init_start_time = process::start_time(init_pid).ok_or_else(|| failure("init exited"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let running = process::children(init_pid)
            .into_iter()
            .any(|pid| process::comm(pid).as_deref() == Some("sleep"));
        if running {
            return Ok((init_pid, init_start_time));
        }
        if child.try_wait()?.is_some() {
            return Err(failure("bubblewrap exited"));
        }
        if Instant::now() > deadline {
            return Err(failure("timeout"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Finds `"child-pid": N` in bubblewrap's JSON status stream (one object per line).
fn parse_child_pid(text: &[u8]) -> Option<i32> {
    text.split(|byte| *byte == b'\n')
        .filter_map(|line| serde_json::from_slice::<serde_json::Value>(line).ok())
        .find_map(|status| status.get("child-pid")?.as_i64())
        .and_then(|pid| i32::try_from(pid).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_user_replaces_uid_1000() {
        let file = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n";
        let out = with_sandbox_user(file, "daytona:x:1000:1000::/home/daytona:/bin/bash");
        assert_eq!(
            out,
            "root:x:0:0:root:/root:/bin/bash\ndaytona:x:1000:1000::/home/daytona:/bin/bash\n"
        );
    }

    #[test]
    fn child_pid_is_parsed_from_status() {
        assert_eq!(parse_child_pid(b"{ \"child-pid\": 42 }\n"), Some(42));
        assert_eq!(parse_child_pid(b"{ \"child-pid\": 4"), None);
    }
}
