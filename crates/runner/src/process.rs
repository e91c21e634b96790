//! Facts about host processes, read from /proc.

use std::path::Path;

/// The start time of a process (field 22 of /proc/<pid>/stat, in clock ticks since boot), or
/// None when it does not exist or is a zombie. Together with the pid it identifies a process
/// even after pids are reused.
pub(crate) fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields after the name start at field 3 (state); start time is field 22.
    fields.nth(22 - 4)?.parse().ok()
}

/// The file name of the program a process runs (argv[0]'s last component).
pub(crate) fn program_name(pid: i32) -> Option<String> {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let argv0 = cmdline.split(|byte| *byte == 0).next()?;
    let name = Path::new(std::str::from_utf8(argv0).ok()?).file_name()?;
    Some(name.to_string_lossy().into_owned())
}

/// The direct children of a process (needs CONFIG_PROC_CHILDREN).
pub(crate) fn children(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|child| child.parse().ok())
        .collect()
}

/// Whether some process runs `program` (its argv[0]'s file name) with `arg` among its arguments.
pub(crate) fn runs_with_argument(program: &str, arg: &str) -> bool {
    !with_argument(program, arg).is_empty()
}

/// The processes that run `program` (its argv[0]'s file name) with `arg` among their arguments.
pub(crate) fn with_argument(program: &str, arg: &str) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<i32>().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let mut argv = cmdline.split(|byte| *byte == 0);
            let name = argv
                .next()
                .and_then(|argv0| Path::new(std::str::from_utf8(argv0).ok()?).file_name());
            let found =
                name.is_some_and(|name| name == program) && argv.any(|item| item == arg.as_bytes());
            found.then_some(pid)
        })
        .collect()
}

/// The kernel's command name of a process (`comm`).
pub(crate) fn comm(pid: i32) -> Option<String> {
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(comm.trim_end().to_owned())
}

pub(crate) fn kill(pid: i32, signal: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe {
        libc::kill(pid, signal);
    }
}

/// Finds a program in the standard system directories (the runner never trusts the caller's
/// PATH, which it does not pass on either).
pub(crate) fn find_program(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin", "/usr/local/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_visible() {
        let pid = std::process::id() as i32;
        assert!(start_time(pid).is_some());
        assert_eq!(start_time(pid), start_time(pid));
        assert!(program_name(pid).is_some());
        assert!(start_time(i32::MAX).is_none());
    }
}
