//! The seccomp filter of every sandbox process: the init (through bubblewrap) and every toolbox
//! process (installed before `nsenter`, so inherited by everything the command starts). It
//! refuses what a code sandbox does not need and what widens the kernel's attack surface; the
//! list is documented in docs/CONFIGURATION.md ("Sandbox isolation"). Everything else is allowed:
//! the sandbox user already has no capabilities, so the kernel's own permission checks (ptrace
//! of another uid, mounting, ...) stay in force on top.

use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::RunnerError;

/// Refused with EPERM whatever their arguments.
const REFUSED: &[i64] = &[
    // Kernel code and the running kernel.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_reboot,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_acct,
    libc::SYS_quotactl,
    libc::SYS_syslog,
    libc::SYS_uselib,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_lookup_dcookie,
    // The kernel keyring is not namespaced: keys would be shared with the host.
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_keyctl,
    // Frequent sources of kernel exploits that code sandboxes do not need.
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_open_by_handle_at,
    // Mounts and clocks (need capabilities the user lacks; refused before the kernel looks).
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
];

/// Refused with EPERM when their first argument (the flags) asks for a new user namespace:
/// inside one an unprivileged process gains every capability over new namespaces of its own.
const NO_NEW_USER_NAMESPACE: &[i64] = &[libc::SYS_unshare, libc::SYS_clone];

/// The compiled filters, in the order they are installed.
pub(crate) struct Filters {
    programs: Vec<BpfProgram>,
}

/// Built once per runner process; an error means the filter cannot be expressed on this
/// architecture, and then no sandbox may start.
pub(crate) fn filters() -> Result<&'static Filters, RunnerError> {
    static FILTERS: OnceLock<Result<Filters, String>> = OnceLock::new();
    FILTERS
        .get_or_init(|| build().map_err(|err| err.to_string()))
        .as_ref()
        .map_err(|err| RunnerError::Unavailable(format!("cannot build the seccomp filter: {err}")))
}

fn build() -> Result<Filters, seccompiler::Error> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)?;
    let new_user_ns = SeccompRule::new(vec![SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(libc::CLONE_NEWUSER as u64),
        libc::CLONE_NEWUSER as u64,
    )?])?;
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> =
        REFUSED.iter().map(|nr| (*nr, Vec::new())).collect();
    for nr in NO_NEW_USER_NAMESPACE {
        refused.insert(*nr, vec![new_user_ns.clone()]);
    }
    let eperm = SeccompFilter::new(
        refused,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )?;
    // clone3 passes its flags in memory, out of a filter's sight: answering ENOSYS makes the C
    // library fall back to clone, whose flags the filter sees. (EPERM would break threads.)
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    Ok(Filters {
        programs: vec![eperm.try_into()?, clone3.try_into()?],
    })
}

impl Filters {
    /// Installs the filters on the calling thread (and so on everything it executes).
    /// Async-signal-safe: meant for `pre_exec`.
    pub(crate) fn apply(&self) -> std::io::Result<()> {
        for program in &self.programs {
            seccompiler::apply_filter(program).map_err(std::io::Error::other)?;
        }
        Ok(())
    }

    /// Each filter as a sealed memory file of raw `sock_filter`s, for bubblewrap's
    /// `--add-seccomp-fd`.
    pub(crate) fn memfds(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.programs
            .iter()
            .map(|program| program_memfd(program.as_slice()))
            .collect()
    }
}

fn program_memfd(program: &[seccompiler::sock_filter]) -> std::io::Result<OwnedFd> {
    let bytes: Vec<u8> = program
        .iter()
        .flat_map(|insn| {
            let mut raw = [0u8; 8];
            raw[..2].copy_from_slice(&insn.code.to_ne_bytes());
            raw[2] = insn.jt;
            raw[3] = insn.jf;
            raw[4..].copy_from_slice(&insn.k.to_ne_bytes());
            raw
        })
        .collect();
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned from here on.
    let fd = unsafe { libc::memfd_create(c"cellar-seccomp".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, &bytes)?;
    std::io::Seek::rewind(&mut file)?;
    Ok(OwnedFd::from(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile() {
        let filters = filters().expect("filters");
        assert_eq!(filters.programs.len(), 2);
        assert!(filters.programs.iter().all(|program| !program.is_empty()));
    }
}
