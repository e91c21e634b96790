//! Shared by the integration tests.

use std::path::Path;

/// A runner state directory that, when dropped, kills the sandboxes recorded in it and detaches
/// its mounts: a failing test must not leave sandboxes behind (they outlive the runner by design).
pub struct StateDir(tempfile::TempDir);

impl StateDir {
    pub fn new() -> StateDir {
        StateDir(tempfile::tempdir().unwrap())
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let records = std::fs::read_dir(self.path().join("sandboxes"))
            .into_iter()
            .flatten();
        for entry in records.flatten() {
            // Removing a network namespace's bind mount ends the sandbox's pasta.
            if entry.path().extension().is_some_and(|ext| ext == "netns") {
                detach(&entry.path());
                let _ = std::fs::remove_file(entry.path());
                continue;
            }
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            let (Some(pid), Some(start)) = (
                record["init_pid"].as_i64(),
                record["init_start_time"].as_u64(),
            ) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let started = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(19)?.parse::<u64>().ok());
            if started == Some(start) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            let id = record["id"].as_str().unwrap_or_default();
            for hierarchy in ["", "cpu/", "memory/"] {
                let cgroup = format!("/sys/fs/cgroup/{hierarchy}cellar/{id}");
                // The kernel frees a cgroup a moment after its last process died.
                for _ in 0..100 {
                    match std::fs::remove_dir(&cgroup) {
                        Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                            std::thread::sleep(std::time::Duration::from_millis(10))
                        }
                        _ => break,
                    }
                }
            }
        }
        let mounts = std::fs::read_dir(self.path().join("mounts"))
            .into_iter()
            .flatten();
        for entry in mounts.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                detach(&entry.path());
            }
        }
    }
}

fn detach(path: &Path) {
    if let Ok(path) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 on a NUL-terminated path; failure (not mounted) is fine.
        unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
    }
}
