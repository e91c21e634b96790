//! Resource limits through cgroups: v2 when the unified hierarchy has the controllers, else the
//! v1 `cpu` and `memory` hierarchies. Limits are best effort: where the kernel or the cgroup file
//! system refuses, the sandbox runs unlimited and this is logged once.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CPU_PERIOD_US: u64 = 100_000;

enum Hierarchy {
    V2,
    V1,
    Unsupported,
}

pub(crate) struct Cgroups {
    hierarchy: Hierarchy,
    warned: AtomicBool,
}

impl Cgroups {
    pub(crate) fn detect() -> Cgroups {
        let root = Path::new(CGROUP_ROOT);
        let hierarchy = if root.join("cgroup.controllers").exists() {
            Hierarchy::V2
        } else if root.join("cpu").is_dir() && root.join("memory").is_dir() {
            Hierarchy::V1
        } else {
            Hierarchy::Unsupported
        };
        Cgroups {
            hierarchy,
            warned: AtomicBool::new(false),
        }
    }

    /// The cgroup directories of a sandbox (one for v2, one per controller for v1).
    fn dirs(&self, sandbox_id: &str) -> Vec<PathBuf> {
        let root = Path::new(CGROUP_ROOT);
        match self.hierarchy {
            Hierarchy::V2 => vec![root.join("cellar").join(sandbox_id)],
            Hierarchy::V1 => ["cpu", "memory"]
                .iter()
                .map(|controller| root.join(controller).join("cellar").join(sandbox_id))
                .collect(),
            Hierarchy::Unsupported => Vec::new(),
        }
    }

    /// Creates the sandbox's cgroups with its limits (0 = unlimited).
    pub(crate) fn create(&self, sandbox_id: &str, cpu: u32, memory_gib: u32) {
        if let Err(err) = self.try_create(sandbox_id, cpu, memory_gib) {
            self.warn_once(&format!(
                "cannot apply cgroup limits, sandboxes run unlimited: {err}"
            ));
            self.remove(sandbox_id);
        }
    }

    fn try_create(&self, sandbox_id: &str, cpu: u32, memory_gib: u32) -> std::io::Result<()> {
        let memory_bytes = u64::from(memory_gib) << 30;
        let cpu_quota_us = u64::from(cpu) * CPU_PERIOD_US;
        match self.hierarchy {
            Hierarchy::Unsupported => {
                return Err(std::io::Error::other("no cgroup hierarchy found"));
            }
            Hierarchy::V2 => {
                let root = Path::new(CGROUP_ROOT);
                let parent = root.join("cellar");
                std::fs::create_dir_all(&parent)?;
                std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory")?;
                std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory")?;
                let dir = parent.join(sandbox_id);
                std::fs::create_dir_all(&dir)?;
                if cpu > 0 {
                    std::fs::write(
                        dir.join("cpu.max"),
                        format!("{cpu_quota_us} {CPU_PERIOD_US}"),
                    )?;
                }
                if memory_gib > 0 {
                    std::fs::write(dir.join("memory.max"), memory_bytes.to_string())?;
                }
            }
            Hierarchy::V1 => {
                let dirs = self.dirs(sandbox_id);
                for dir in &dirs {
                    std::fs::create_dir_all(dir)?;
                }
                let (cpu_dir, memory_dir) = (&dirs[0], &dirs[1]);
                if cpu > 0 {
                    std::fs::write(cpu_dir.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())?;
                    std::fs::write(cpu_dir.join("cpu.cfs_quota_us"), cpu_quota_us.to_string())?;
                }
                if memory_gib > 0 {
                    std::fs::write(
                        memory_dir.join("memory.limit_in_bytes"),
                        memory_bytes.to_string(),
                    )?;
                }
            }
        }
        Ok(())
    }

    /// The `cgroup.procs` files a new process of the sandbox joins (only those that exist), as
    /// C strings so that [`join_self`] can run between fork and exec.
    pub(crate) fn procs_files(&self, sandbox_id: &str) -> Vec<CString> {
        self.dirs(sandbox_id)
            .into_iter()
            .map(|dir| dir.join("cgroup.procs"))
            .filter(|file| file.exists())
            .filter_map(|file| CString::new(file.as_os_str().as_bytes()).ok())
            .collect()
    }

    /// Removes the sandbox's cgroups once its processes are gone (retrying briefly, since the
    /// kernel releases a cgroup slightly after its last process exits).
    pub(crate) fn remove(&self, sandbox_id: &str) {
        for dir in self.dirs(sandbox_id) {
            for _ in 0..50 {
                match std::fs::remove_dir(&dir) {
                    Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    _ => break,
                }
            }
        }
    }

    fn warn_once(&self, message: &str) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!("{message}");
        }
    }
}

/// Moves the calling process into the given cgroups. Runs between fork and exec, so it only
/// uses async-signal-safe calls; writing "0" to `cgroup.procs` means "this process".
pub(crate) fn join_self(procs_files: &[CString]) {
    for file in procs_files {
        // SAFETY: open/write/close on a valid NUL-terminated path; errors are ignored because the
        // limits are best effort.
        unsafe {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
    }
}
