//! End-to-end tests of `cellar mount` / `umount` / `fsck` / `gc` with a real FUSE mount of a
//! volume whose blocks live in a local directory. Needs root and /dev/fuse.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// A volume in a temporary directory: SQLite metadata and a file:// block store.
struct TestVolume {
    dir: TempDir,
    name: String,
}

impl TestVolume {
    fn new(name: &str) -> TestVolume {
        assert!(
            Path::new("/dev/fuse").exists(),
            "these tests need /dev/fuse (modprobe fuse, or --device /dev/fuse in a container)"
        );
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests mount file systems: run them as root"
        );
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("store")).unwrap();
        TestVolume {
            dir,
            name: name.to_owned(),
        }
    }

    fn args(&self) -> Vec<String> {
        let root = self.dir.path().display();
        vec![
            "--meta".into(),
            format!("sqlite://{root}/meta.db"),
            "--store".into(),
            format!("file://{root}/store"),
            "--volume".into(),
            self.name.clone(),
        ]
    }

    fn new_mount_point(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        fs::create_dir(&path).unwrap();
        path
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join("mount.log")
    }

    /// `cellar mount` in the background; returns once the mount is live.
    fn mount(&self, mount_point: &Path) -> Mounted {
        self.mount_logging(mount_point, &self.log_file(), false)
    }

    /// A mount logging to `log`; with `requests`, every FUSE request it serves (fuser's debug
    /// log), which tests count to see what the kernel asked.
    fn mount_logging(&self, mount_point: &Path, log: &Path, requests: bool) -> Mounted {
        let env: &[(&str, &str)] = if requests {
            &[("RUST_LOG", "warn,fuser::request=debug")]
        } else {
            &[]
        };
        let output = cellar_with_env(
            &[
                &["mount".to_string()][..],
                &self.args(),
                &[
                    "--log-file".into(),
                    log.display().to_string(),
                    mount_point.display().to_string(),
                ],
            ]
            .concat(),
            env,
        );
        assert!(
            output.status.success(),
            "cellar mount failed: {}\nlog:\n{}",
            String::from_utf8_lossy(&output.stderr),
            fs::read_to_string(log).unwrap_or_default()
        );
        assert!(
            is_mounted(mount_point),
            "cellar mount returned 0 but nothing is mounted"
        );
        Mounted {
            mount_point: mount_point.to_owned(),
        }
    }

    fn maintenance(&self, command: &str, extra: &[&str]) -> Output {
        let args: Vec<String> = [command.to_string()]
            .into_iter()
            .chain(self.args())
            .chain(extra.iter().map(|a| a.to_string()))
            .collect();
        cellar(&args)
    }
}

/// A live mount; unmounted lazily if a test fails before unmounting it.
struct Mounted {
    mount_point: PathBuf,
}

impl Mounted {
    fn path(&self, relative: &str) -> PathBuf {
        self.mount_point.join(relative)
    }

    fn unmount(self) {
        let output = cellar(&["umount".into(), self.mount_point.display().to_string()]);
        assert!(
            output.status.success(),
            "cellar umount failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            !is_mounted(&self.mount_point),
            "still mounted after cellar umount"
        );
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if is_mounted(&self.mount_point) {
            let _ = cellar(&[
                "umount".into(),
                "--lazy".into(),
                self.mount_point.display().to_string(),
            ]);
        }
    }
}

fn cellar(args: &[String]) -> Output {
    cellar_with_env(args, &[])
}

fn cellar_with_env(args: &[String], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cellar"))
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("running cellar")
}

fn is_mounted(path: &Path) -> bool {
    let canonical = path.canonicalize().unwrap_or_else(|_| path.to_owned());
    cellar_fuse::is_mount_point(&canonical).unwrap()
}

fn flock(file: &fs::File, operation: libc::c_int) -> std::io::Result<()> {
    // SAFETY: flock on a descriptor the File keeps open.
    if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Takes a lock that the close of another descriptor frees: the kernel sends that release to
/// FUSE asynchronously (RELEASE is a background request), so it may land a moment after close.
fn flock_after_close(file: &fs::File, operation: libc::c_int) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match flock(file, operation | libc::LOCK_NB) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("flock still refused 2 s after the holder closed: {e}"),
        }
    }
}

/// Bytes that differ at every offset, larger than the inline threshold and a block.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn file_operations_persist_across_remounts() {
    let volume = TestVolume::new("ops");
    let mount_point = volume.new_mount_point("mnt");
    let big = pattern(5 * 1024 * 1024 + 123);

    let mounted = volume.mount(&mount_point);
    fs::write(mounted.path("hello.txt"), b"hello").unwrap();
    assert_eq!(fs::read(mounted.path("hello.txt")).unwrap(), b"hello");

    // Append, then a random write in the middle.
    let mut file = fs::OpenOptions::new()
        .append(true)
        .open(mounted.path("hello.txt"))
        .unwrap();
    file.write_all(b", world").unwrap();
    drop(file);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(mounted.path("hello.txt"))
        .unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    file.write_all(b"H").unwrap();
    drop(file);
    assert_eq!(
        fs::read(mounted.path("hello.txt")).unwrap(),
        b"Hello, world"
    );

    fs::create_dir_all(mounted.path("dir/sub")).unwrap();
    fs::rename(mounted.path("hello.txt"), mounted.path("dir/greeting.txt")).unwrap();
    assert!(!mounted.path("hello.txt").exists());
    fs::set_permissions(
        mounted.path("dir/greeting.txt"),
        fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::os::unix::fs::symlink("dir/greeting.txt", mounted.path("link")).unwrap();
    assert_eq!(fs::read(mounted.path("link")).unwrap(), b"Hello, world");
    fs::hard_link(
        mounted.path("dir/greeting.txt"),
        mounted.path("dir/sub/hard"),
    )
    .unwrap();
    assert_eq!(
        fs::metadata(mounted.path("dir/sub/hard")).unwrap().nlink(),
        2
    );

    fs::write(mounted.path("big.bin"), &big).unwrap();
    let mut read_back = Vec::new();
    fs::File::open(mounted.path("big.bin"))
        .unwrap()
        .read_to_end(&mut read_back)
        .unwrap();
    assert!(read_back == big, "big file differs right after writing");

    fs::write(mounted.path("doomed"), b"x").unwrap();
    fs::remove_file(mounted.path("doomed")).unwrap();
    fs::create_dir(mounted.path("empty")).unwrap();
    fs::remove_dir(mounted.path("empty")).unwrap();

    // flock: exclusive between two open file descriptions, released by LOCK_UN and by close.
    let first = fs::File::open(mounted.path("big.bin")).unwrap();
    let second = fs::File::open(mounted.path("big.bin")).unwrap();
    flock(&first, libc::LOCK_EX).unwrap();
    let refused = flock(&second, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EWOULDBLOCK));
    flock(&first, libc::LOCK_UN).unwrap();
    flock(&second, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    drop(second);
    flock_after_close(&first, libc::LOCK_SH);
    drop(first);

    assert_eq!(sorted_names(&mount_point), ["big.bin", "dir", "link"]);
    mounted.unmount();
    assert!(
        sorted_names(&mount_point).is_empty(),
        "the mount point shows the volume after unmount"
    );

    let mounted = volume.mount(&mount_point);
    assert_eq!(sorted_names(&mount_point), ["big.bin", "dir", "link"]);
    assert_eq!(sorted_names(&mounted.path("dir")), ["greeting.txt", "sub"]);
    assert_eq!(
        fs::read(mounted.path("dir/greeting.txt")).unwrap(),
        b"Hello, world"
    );
    let meta = fs::metadata(mounted.path("dir/greeting.txt")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
    assert_eq!(meta.nlink(), 2);
    assert_eq!(
        fs::read_link(mounted.path("link")).unwrap(),
        Path::new("dir/greeting.txt")
    );
    assert_eq!(
        fs::read(mounted.path("dir/sub/hard")).unwrap(),
        b"Hello, world"
    );
    assert!(
        fs::read(mounted.path("big.bin")).unwrap() == big,
        "big file differs after remount"
    );
    mounted.unmount();

    let fsck = volume.maintenance("fsck", &["--json"]);
    assert!(
        fsck.status.success(),
        "fsck found problems: {}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&fsck.stdout).unwrap();
    assert_eq!(report["remaining"], serde_json::json!([]));

    let gc = volume.maintenance("gc", &["--grace", "0s", "--json"]);
    assert!(
        gc.status.success(),
        "gc failed: {}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&gc.stdout).unwrap();
    assert!(report["deleted_objects"].is_u64(), "gc report: {report}");
}

/// A tenant's setuid bits and device nodes grant nothing on the host.
#[test]
fn mounts_are_nosuid_and_nodev() {
    let volume = TestVolume::new("flags");
    let mount_point = volume.new_mount_point("mnt");
    let mounted = volume.mount(&mount_point);
    let canonical = mount_point.canonicalize().unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let options = mountinfo
        .lines()
        .map(|line| line.split(' ').collect::<Vec<_>>())
        .find(|fields| Path::new(fields[4]) == canonical)
        .map(|fields| fields[5].to_string())
        .expect("the mount is in mountinfo");
    let options: Vec<&str> = options.split(',').collect();
    assert!(
        options.contains(&"nosuid") && options.contains(&"nodev"),
        "mount options: {options:?}"
    );
    drop(mounted);
}

#[test]
fn two_mounts_of_one_volume_share_data_and_locks() {
    let volume = TestVolume::new("shared");
    let first = volume.mount(&volume.new_mount_point("a"));
    let second = volume.mount(&volume.new_mount_point("b"));

    fs::write(first.path("notes"), b"one").unwrap();
    assert_eq!(fs::read(second.path("notes")).unwrap(), b"one");
    // Close-to-open: a longer rewrite is seen whole, not cut at the old cached size.
    fs::write(first.path("notes"), b"one, two, three").unwrap();
    assert_eq!(fs::read(second.path("notes")).unwrap(), b"one, two, three");

    let here = fs::File::open(first.path("notes")).unwrap();
    let there = fs::File::open(second.path("notes")).unwrap();
    flock(&here, libc::LOCK_EX).unwrap();
    let refused = flock(&there, libc::LOCK_SH | libc::LOCK_NB).unwrap_err();
    assert_eq!(refused.raw_os_error(), Some(libc::EWOULDBLOCK));
    drop(here);
    flock_after_close(&there, libc::LOCK_SH);
    drop(there);

    first.unmount();
    second.unmount();
}

#[test]
fn sigterm_unmounts_a_foreground_mount_and_keeps_the_data() {
    let volume = TestVolume::new("sigterm");
    let mount_point = volume.new_mount_point("mnt");
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_cellar"))
        .args(["mount", "--foreground"])
        .args(volume.args())
        .arg(&mount_point)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&mount_point) {
        assert!(
            daemon.try_wait().unwrap().is_none(),
            "the foreground mount exited early"
        );
        assert!(Instant::now() < deadline, "not mounted after 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let guard = Mounted {
        mount_point: mount_point.clone(),
    };
    fs::write(mount_point.join("kept"), b"survives SIGTERM").unwrap();

    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) }, 0);
    let status = daemon.wait().unwrap();
    let mut stderr = String::new();
    daemon
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM; stderr:\n{stderr}"
    );
    assert!(!is_mounted(&mount_point), "still mounted after SIGTERM");
    drop(guard);

    let mounted = volume.mount(&mount_point);
    assert_eq!(fs::read(mounted.path("kept")).unwrap(), b"survives SIGTERM");
    mounted.unmount();
}

/// The error of a failed command: exactly one line, starting with "error: ".
fn one_line_error(output: &Output) -> String {
    assert_eq!(
        output.status.code(),
        Some(1),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, got:\n{stderr}");
    errors[0].to_owned()
}

/// `cellar mount` of `volume`, with another store URL if given.
fn mount_with(volume: &TestVolume, store_url: Option<&str>, mount_point: &Path) -> Output {
    let mut args = vec!["mount".to_string()];
    for arg in volume.args() {
        match store_url {
            Some(url) if arg.starts_with("file://") => args.push(url.to_owned()),
            _ => args.push(arg),
        }
    }
    args.push("--log-file".into());
    args.push(volume.log_file().display().to_string());
    args.push(mount_point.display().to_string());
    // Fixed credentials: an s3:// store must not go looking for real ones.
    Command::new(env!("CARGO_BIN_EXE_cellar"))
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .stdin(Stdio::null())
        .output()
        .expect("running cellar")
}

#[test]
fn missing_mount_point_is_reported() {
    let volume = TestVolume::new("errors");
    let missing = volume.dir.path().join("nowhere");
    let error = one_line_error(&mount_with(&volume, None, &missing));
    assert_eq!(
        error,
        format!("error: mount point {} does not exist", missing.display())
    );
}

#[test]
fn bad_url_is_reported() {
    let volume = TestVolume::new("errors");
    let mount_point = volume.new_mount_point("mnt");
    let error = one_line_error(&mount_with(&volume, Some("not a url"), &mount_point));
    assert!(error.starts_with("error: invalid --store URL"), "{error}");
    assert!(!is_mounted(&mount_point));
}

#[test]
fn unreachable_store_is_reported() {
    let volume = TestVolume::new("errors");
    let mount_point = volume.new_mount_point("mnt");
    let started = Instant::now();
    let unreachable = "s3://bucket?endpoint=http://127.0.0.1:1&region=us-east-1";
    let output = mount_with(&volume, Some(unreachable), &mount_point);
    let error = one_line_error(&output);
    assert!(
        error.starts_with("error: cannot open volume errors"),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    assert!(!is_mounted(&mount_point));
}

#[test]
fn mounting_twice_on_one_directory_is_refused() {
    let volume = TestVolume::new("twice");
    let mount_point = volume.new_mount_point("mnt");
    let mounted = volume.mount(&mount_point);
    let error = one_line_error(&mount_with(&volume, None, &mount_point));
    assert_eq!(
        error,
        format!(
            "error: mount point {} is already mounted",
            mount_point.display()
        )
    );
    mounted.unmount();
}

#[test]
fn usage_errors_exit_with_2() {
    let output = cellar(&["mount".into()]);
    assert_eq!(output.status.code(), Some(2));
    let output = cellar(&["no-such-command".into()]);
    assert_eq!(output.status.code(), Some(2));
}

/// Polls `check` until it holds; returns how long that took. Fails after `within`.
fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < within,
            "{what}: not seen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    started.elapsed()
}

#[test]
fn changes_of_one_mount_reach_the_kernel_caches_of_another_at_once() {
    // The kernel caches entries and attributes for a minute; only the pushed change feed can
    // make these show within the bound.
    const PUSHED: Duration = Duration::from_secs(5);
    let volume = TestVolume::new("pushed");
    let first = volume.mount(&volume.new_mount_point("a"));
    let second = volume.mount(&volume.new_mount_point("b"));

    fs::write(first.path("notes"), b"one").unwrap();
    eventually(PUSHED, "a new file", || {
        fs::metadata(second.path("notes")).is_ok_and(|m| m.len() == 3)
    });
    // Cached attributes: the size grows under the second mount's stat.
    let mut appending = fs::OpenOptions::new()
        .append(true)
        .open(first.path("notes"))
        .unwrap();
    appending.write_all(b", two").unwrap();
    drop(appending);
    eventually(PUSHED, "a grown size", || {
        fs::metadata(second.path("notes")).is_ok_and(|m| m.len() == 8)
    });
    // Cached entries: a rename removes the old name and shows the new one.
    fs::rename(first.path("notes"), first.path("renamed")).unwrap();
    eventually(PUSHED, "a rename", || {
        !second.path("notes").exists() && second.path("renamed").exists()
    });
    // A directory listed before it gains an entry lists it afterwards.
    fs::create_dir(first.path("dir")).unwrap();
    eventually(PUSHED, "a new directory", || second.path("dir").is_dir());
    assert!(sorted_names(&second.path("dir")).is_empty());
    fs::write(first.path("dir/inside"), b"x").unwrap();
    eventually(PUSHED, "a new entry in a listed directory", || {
        sorted_names(&second.path("dir")) == ["inside"]
    });
    // Removing it from the second mount shows on the first.
    fs::remove_file(second.path("dir/inside")).unwrap();
    eventually(PUSHED, "a removal", || {
        !first.path("dir/inside").exists() && sorted_names(&first.path("dir")).is_empty()
    });

    first.unmount();
    second.unmount();
}

/// How many FUSE requests a mount logging its requests served whose line contains `what`.
fn served(log: &Path, what: &str) -> usize {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(what))
        .count()
}

fn missing(path: &Path) -> bool {
    fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

#[test]
fn missing_names_stay_cached_in_the_kernel_until_another_mount_creates_them() {
    const PUSHED: Duration = Duration::from_secs(5);
    let volume = TestVolume::new("negative");
    let first = volume.mount(&volume.new_mount_point("a"));
    let log = volume.dir.path().join("b.log");
    let second = volume.mount_logging(&volume.new_mount_point("b"), &log, true);

    for _ in 0..3 {
        assert!(missing(&second.path("later")));
    }
    assert_eq!(
        served(&log, r#"LOOKUP name "later""#),
        1,
        "the kernel asked again for a name it was told is missing"
    );
    fs::write(first.path("later"), b"now").unwrap();
    eventually(PUSHED, "a missing name another mount created", || {
        fs::read(second.path("later")).is_ok_and(|data| data == b"now")
    });

    // In a subdirectory, a directory, and a name removed then created again.
    fs::create_dir(first.path("dir")).unwrap();
    eventually(PUSHED, "a new directory", || second.path("dir").is_dir());
    assert!(missing(&second.path("dir/sub")));
    fs::create_dir(first.path("dir/sub")).unwrap();
    eventually(PUSHED, "a missing directory another mount created", || {
        second.path("dir/sub").is_dir()
    });
    fs::remove_file(first.path("later")).unwrap();
    eventually(PUSHED, "a removal", || missing(&second.path("later")));
    fs::write(first.path("later"), b"again").unwrap();
    eventually(PUSHED, "a name created again", || {
        fs::read(second.path("later")).is_ok_and(|data| data == b"again")
    });
    // A rename onto a missing name, and a hard link.
    assert!(missing(&second.path("moved")) && missing(&second.path("linked")));
    fs::rename(first.path("later"), first.path("moved")).unwrap();
    fs::hard_link(first.path("moved"), first.path("linked")).unwrap();
    eventually(PUSHED, "a rename and a link onto missing names", || {
        second.path("moved").exists() && second.path("linked").exists()
    });

    first.unmount();
    second.unmount();
}

#[test]
fn the_page_cache_outlives_a_close_until_another_mount_changes_the_file() {
    let volume = TestVolume::new("pagecache");
    let first = volume.mount(&volume.new_mount_point("a"));
    let log = volume.dir.path().join("b.log");
    let second = volume.mount_logging(&volume.new_mount_point("b"), &log, true);

    let old = pattern(1 << 20);
    fs::write(first.path("data"), &old).unwrap();
    // Changes are pushed in commit order: once a later one shows, the writes' invalidations (which
    // would rightly drop pages read before they arrive) are behind.
    fs::write(first.path("marker"), b"").unwrap();
    eventually(Duration::from_secs(5), "a later change", || {
        second.path("marker").exists()
    });
    assert_eq!(fs::read(second.path("data")).unwrap(), old);
    assert!(served(&log, "READ fh") > 0, "no READ request logged");
    // The writer's release of the file is asynchronous (FUSE RELEASE) and may still push a
    // change after the marker; let it settle, then count from a cached copy.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fs::read(second.path("data")).unwrap(), old);
    let reads = served(&log, "READ fh");
    for _ in 0..3 {
        assert_eq!(fs::read(second.path("data")).unwrap(), old);
    }
    assert_eq!(
        served(&log, "READ fh"),
        reads,
        "a re-open of an unchanged file read it from the daemon again"
    );
    // The same size with other bytes: only a dropped page cache shows them.
    let new: Vec<u8> = old.iter().map(|b| !b).collect();
    fs::write(first.path("data"), &new).unwrap();
    assert_eq!(fs::read(second.path("data")).unwrap(), new);
    assert!(served(&log, "READ fh") > reads);

    first.unmount();
    second.unmount();
}

#[test]
fn writes_do_not_ask_for_security_capability_each_time() {
    let volume = TestVolume::new("killpriv");
    let log = volume.dir.path().join("requests.log");
    let mounted = volume.mount_logging(&volume.new_mount_point("m"), &log, true);

    let mut file = fs::File::create(mounted.path("f")).unwrap();
    for i in 0..100u8 {
        file.write_all(&[i; 4096]).unwrap();
    }
    drop(file);
    assert!(
        served(&log, "WRITE fh") >= 100,
        "the writes were not logged"
    );
    let asked = served(&log, r#"GETXATTR name "security.capability""#);
    assert!(
        asked <= 1,
        "{asked} getxattr(security.capability) requests for 100 writes"
    );
    mounted.unmount();
}

fn c_path(path: &Path) -> std::ffi::CString {
    std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// getxattr(2): `None` for ENODATA.
fn get_xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    let mut value = vec![0u8; 256];
    // SAFETY: NUL-terminated strings and a buffer of the length passed.
    let len = unsafe {
        libc::getxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    if len < 0 {
        let error = std::io::Error::last_os_error();
        assert_eq!(
            error.raw_os_error(),
            Some(libc::ENODATA),
            "getxattr: {error}"
        );
        return None;
    }
    value.truncate(len as usize);
    Some(value)
}

fn set_xattr(path: &Path, name: &str, value: &[u8]) {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings and a value of the length passed.
    let done = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(done, 0, "setxattr: {}", std::io::Error::last_os_error());
}

fn remove_xattr(path: &Path, name: &str) {
    let (path, name) = (c_path(path), std::ffi::CString::new(name).unwrap());
    // SAFETY: NUL-terminated strings.
    let done = unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) };
    assert_eq!(done, 0, "removexattr: {}", std::io::Error::last_os_error());
}

#[test]
fn xattrs_of_listed_files_follow_changes_of_both_mounts() {
    const PUSHED: Duration = Duration::from_secs(5);
    let volume = TestVolume::new("xattrs");
    let first = volume.mount(&volume.new_mount_point("a"));
    let second = volume.mount(&volume.new_mount_point("b"));
    fs::create_dir(first.path("dir")).unwrap();
    for name in ["one", "two"] {
        fs::write(first.path(&format!("dir/{name}")), b"x").unwrap();
    }
    set_xattr(&first.path("dir/two"), "user.kept", b"2");

    // The listing (READDIRPLUS) tells the second mount which files have no xattrs.
    eventually(PUSHED, "the listing", || {
        second.path("dir").is_dir() && sorted_names(&second.path("dir")) == ["one", "two"]
    });
    assert_eq!(get_xattr(&second.path("dir/one"), "user.new"), None);
    assert_eq!(
        get_xattr(&second.path("dir/two"), "user.kept").as_deref(),
        Some(&b"2"[..])
    );
    set_xattr(&first.path("dir/one"), "user.new", b"1");
    eventually(PUSHED, "an xattr set by another mount", || {
        get_xattr(&second.path("dir/one"), "user.new").as_deref() == Some(&b"1"[..])
    });
    // Set and removed on this mount: seen at once.
    assert_eq!(sorted_names(&second.path("dir")), ["one", "two"]);
    remove_xattr(&second.path("dir/one"), "user.new");
    assert_eq!(get_xattr(&second.path("dir/one"), "user.new"), None);
    set_xattr(&second.path("dir/one"), "user.mine", b"m");
    assert_eq!(
        get_xattr(&second.path("dir/one"), "user.mine").as_deref(),
        Some(&b"m"[..])
    );
    assert_eq!(
        get_xattr(&first.path("dir/one"), "user.mine").as_deref(),
        Some(&b"m"[..])
    );

    first.unmount();
    second.unmount();
}
