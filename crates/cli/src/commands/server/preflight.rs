//! What `cellar server` needs on this machine at run time, checked before it binds: a machine
//! that lacks something fails at start, naming all of it, rather than at its first sandbox.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{bail, Result};

/// The programs the embedded runner, its mount daemons and every sandbox run, each with the
/// Debian package that provides it.
const PROGRAMS: &[(&str, &str)] = &[
    ("fusermount3", "fuse3"),
    ("bwrap", "bubblewrap"),
    ("nsenter", "util-linux"),
    ("setpriv", "util-linux"),
    ("pasta", "passt"),
    ("ip", "iproute2"),
];

/// Where the runner, the mount daemons and the sandboxes look programs up: the system
/// directories, whatever the caller's PATH.
const SYSTEM_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The README's first command: it installs whatever is missing, then starts the server.
const START_SCRIPT: &str = "scripts/start-server.sh";

/// What the check looks at; a test fakes it.
struct Host<'a> {
    /// Directories searched for the programs, `:`-separated.
    search_path: &'a str,
    fuse_device: &'a Path,
    root: bool,
}

/// One unmet need: what is missing, how to get it and the package that provides it, if any.
#[derive(Debug)]
struct Missing {
    what: String,
    remedy: String,
    package: Option<&'static str>,
}

/// Fails, naming every missing item and its remedy, unless this machine has all the server needs.
pub fn check(data_dir: &Path, cellar_bin: &Path) -> Result<()> {
    let host = Host {
        search_path: SYSTEM_PATH,
        fuse_device: Path::new("/dev/fuse"),
        // SAFETY: geteuid has no preconditions.
        root: unsafe { libc::geteuid() } == 0,
    };
    let missing = missing(&host, data_dir, cellar_bin);
    if missing.is_empty() {
        return Ok(());
    }
    bail!("{}", report(&missing))
}

fn missing(host: &Host<'_>, data_dir: &Path, cellar_bin: &Path) -> Vec<Missing> {
    let mut missing = Vec::new();
    if !host.root {
        missing.push(Missing {
            what: "root".to_owned(),
            remedy: "run it as root: the runner mounts FUSE volumes and creates namespaces"
                .to_owned(),
            package: None,
        });
    }
    if !host.fuse_device.exists() {
        missing.push(Missing {
            what: host.fuse_device.display().to_string(),
            remedy:
                "load the fuse module (modprobe fuse), or give the container --device /dev/fuse"
                    .to_owned(),
            package: None,
        });
    }
    for &(program, package) in PROGRAMS {
        if !host
            .search_path
            .split(':')
            .any(|dir| is_executable(&Path::new(dir).join(program)))
        {
            missing.push(Missing {
                what: program.to_owned(),
                remedy: format!("install the package {package}"),
                package: Some(package),
            });
        }
    }
    if !is_executable(cellar_bin) {
        missing.push(Missing {
            what: format!("the cellar binary {}", cellar_bin.display()),
            remedy: "set CELLAR_BIN to the cellar executable the mount daemons run".to_owned(),
            package: None,
        });
    }
    if let Some(dir) = unwritable(data_dir) {
        missing.push(Missing {
            what: format!("a writable data directory ({} is not)", dir.display()),
            remedy: "pass --data-dir with a writable directory".to_owned(),
            package: None,
        });
    }
    missing
}

fn report(missing: &[Missing]) -> String {
    let mut text = "this machine lacks what `cellar server` needs to run sandboxes:".to_owned();
    for item in missing {
        text.push_str(&format!("\n  - {}: {}", item.what, item.remedy));
    }
    let mut packages: Vec<&str> = Vec::new();
    for package in missing.iter().filter_map(|item| item.package) {
        if !packages.contains(&package) {
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        text.push_str(&format!(
            "\ninstall them as root with `apt-get install {}`, or run {START_SCRIPT} as root: it \
             installs what is missing and starts the server",
            packages.join(" ")
        ));
    }
    text
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// The data directory, or its nearest existing ancestor (the server creates the rest), when that
/// cannot be written to.
fn unwritable(data_dir: &Path) -> Option<&Path> {
    let existing = data_dir.ancestors().find(|dir| dir.exists())?;
    let Ok(path) = CString::new(existing.as_os_str().as_bytes()) else {
        return Some(existing);
    };
    // SAFETY: a NUL-terminated path; access only reads it. It also reports a read-only file system.
    let writable =
        existing.is_dir() && unsafe { libc::access(path.as_ptr(), libc::W_OK | libc::X_OK) } == 0;
    (!writable).then_some(existing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(missing: &[Missing]) -> Vec<&str> {
        missing.iter().map(|item| item.what.as_str()).collect()
    }

    #[test]
    fn names_every_missing_program_and_its_package() {
        let empty = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let host = Host {
            search_path: empty.path().to_str().unwrap(),
            fuse_device: &empty.path().join("fuse"),
            root: false,
        };
        let cellar = std::env::current_exe().unwrap();
        let missing = missing(&host, &data.path().join("new"), &cellar);
        let fuse = empty.path().join("fuse").display().to_string();
        let mut expected = vec!["root", fuse.as_str()];
        expected.extend(PROGRAMS.iter().map(|(program, _)| *program));
        assert_eq!(named(&missing), expected);

        let report = report(&missing);
        for package in ["fuse3", "bubblewrap", "util-linux", "passt", "iproute2"] {
            assert!(report.contains(package), "{package} in {report}");
        }
        assert!(report.contains("apt-get install fuse3 bubblewrap util-linux passt iproute2`"));
        assert!(report.contains(START_SCRIPT));
    }

    #[test]
    fn nothing_missing_when_everything_is_there() {
        let bin = tempfile::tempdir().unwrap();
        for (program, _) in PROGRAMS {
            let path = bin.path().join(program);
            std::fs::write(&path, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let fuse = bin.path().join("fuse");
        std::fs::write(&fuse, "").unwrap();
        let host = Host {
            search_path: &format!("/nonexistent:{}", bin.path().display()),
            fuse_device: &fuse,
            root: true,
        };
        let cellar = std::env::current_exe().unwrap();
        let missing = missing(&host, &bin.path().join("data/dir"), &cellar);
        assert!(missing.is_empty(), "{missing:?}");
    }

    #[test]
    fn a_program_without_execute_permission_a_bad_binary_or_data_dir_count_as_missing() {
        let bin = tempfile::tempdir().unwrap();
        let not_executable = bin.path().join("bwrap");
        std::fs::write(&not_executable, "").unwrap();
        let host = Host {
            search_path: bin.path().to_str().unwrap(),
            fuse_device: bin.path(),
            root: true,
        };
        let data_dir = not_executable.join("data");
        let missing = missing(&host, &data_dir, &bin.path().join("cellar"));
        let named = named(&missing);
        assert!(named.contains(&"bwrap"));
        assert!(named
            .iter()
            .any(|what| what.starts_with("the cellar binary")));
        assert!(named
            .iter()
            .any(|what| what.starts_with("a writable data directory")));
    }
}
