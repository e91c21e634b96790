//! Usage, `st_blocks` and byte quotas as programs see them through a real FUSE mount (`du`,
//! `df`, `dd`). Needs root and /dev/fuse.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use cellar_vfs::maintenance;
use cellar_vfs::VolumeConfig;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// A mounted volume in a temporary directory (SQLite metadata, file:// store); unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
    mount_point: PathBuf,
}

impl Mounted {
    fn new() -> Mounted {
        assert!(
            Path::new("/dev/fuse").exists(),
            "these tests need /dev/fuse (modprobe fuse, or --device /dev/fuse in a container)"
        );
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests mount: run them as root"
        );
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("store")).unwrap();
        let mount_point = dir.path().join("mnt");
        fs::create_dir(&mount_point).unwrap();
        let mounted = Mounted { dir, mount_point };
        let config = mounted.config();
        let output = run(Command::new(env!("CARGO_BIN_EXE_cellar")).args([
            "mount",
            "--meta",
            &config.meta_url,
            "--store",
            &config.store_url,
            "--volume",
            &config.volume,
            "--log-file",
            &mounted.dir.path().join("mount.log").display().to_string(),
            &mounted.mount_point.display().to_string(),
        ]));
        assert!(
            output.status.success(),
            "cellar mount failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        mounted
    }

    /// The volume as `maintenance` opens it (the server's view).
    fn config(&self) -> VolumeConfig {
        let root = self.dir.path().display();
        VolumeConfig {
            meta_url: format!("sqlite://{root}/meta.db"),
            store_url: format!("file://{root}/store"),
            volume: "quota".into(),
            cache_mem_bytes: 0,
            cache_dir: None,
            cache_disk_bytes: 0,
            mount_point: String::new(),
            store_timeouts: Default::default(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.mount_point.join(name)
    }

    fn used_bytes(&self) -> u64 {
        maintenance::usage(&self.config()).unwrap().bytes
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run(Command::new(env!("CARGO_BIN_EXE_cellar"))
            .args(["umount", &self.mount_point.display().to_string()]));
    }
}

fn run(command: &mut Command) -> Output {
    command
        .stdin(Stdio::null())
        .output()
        .expect("running a command")
}

/// Runs a shell command line; returns (success, stdout, stderr).
fn sh(line: &str) -> (bool, String, String) {
    let output = run(Command::new("sh").args(["-c", line]));
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sh_ok(line: &str) -> String {
    let (ok, stdout, stderr) = sh(line);
    assert!(ok, "{line} failed: {stderr}");
    stdout
}

/// The first number `du -B1` prints for a path.
fn du_bytes(path: &Path) -> u64 {
    let out = sh_ok(&format!("du -B1 '{}'", path.display()));
    out.split_whitespace().next().unwrap().parse().unwrap()
}

/// `df -B1` of the mount: (size, used, available).
fn df(mount: &Mounted) -> (u64, u64, u64) {
    let out = sh_ok(&format!(
        "df -B1 --output=size,used,avail '{}'",
        mount.mount_point.display()
    ));
    let numbers: Vec<u64> = out
        .lines()
        .nth(1)
        .unwrap()
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect();
    (numbers[0], numbers[1], numbers[2])
}

fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut file = fs::File::open(path).unwrap();
    file.seek(SeekFrom::Start(offset)).unwrap();
    let mut out = vec![0u8; len];
    file.read_exact(&mut out).unwrap();
    out
}

#[test]
fn du_counts_the_data_of_a_sparse_file_and_agrees_with_the_usage() {
    let mount = Mounted::new();
    let sparse = mount.path("sparse");
    // 10 GiB with 200 KiB of data at 5 GiB.
    sh_ok(&format!(
        "truncate -s 10G '{0}' && dd if=/dev/urandom of='{0}' bs=200K count=1 seek=5368709120 oflag=seek_bytes conv=notrunc status=none",
        sparse.display()
    ));
    let meta = fs::metadata(&sparse).unwrap();
    assert_eq!(meta.len(), 10 * GIB);
    assert_eq!(meta.blocks(), 200 * KIB / 512);
    assert_eq!(du_bytes(&sparse), 200 * KIB);
    assert_eq!(mount.used_bytes(), 200 * KIB);

    // A dense file: du equals its size; du of the mount equals the usage.
    sh_ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=3 status=none",
        mount.path("dense").display()
    ));
    assert_eq!(du_bytes(&mount.path("dense")), 3 * MIB);
    let used = mount.used_bytes();
    assert_eq!(used, 3 * MIB + 200 * KIB);
    // `du` of the root counts the directory's own st_blocks (0) and every file's.
    assert_eq!(du_bytes(&mount.mount_point), used);

    // Truncating into the data frees it at once.
    sh_ok(&format!("truncate -s 5G '{}'", sparse.display()));
    assert_eq!(du_bytes(&sparse), 0);
    assert_eq!(mount.used_bytes(), 3 * MIB);
}

#[test]
fn df_shows_the_quota_and_dd_past_it_fails_with_edquot_leaving_earlier_files_intact() {
    let mount = Mounted::new();
    let (size, _, _) = df(&mount);
    assert!(
        size >= 1 << 50,
        "without a quota the size is the virtual capacity: {size}"
    );
    sh_ok(&format!(
        "dd if=/dev/urandom of='{}' bs=1M count=10 status=none",
        mount.path("first").display()
    ));
    let first = fs::read(mount.path("first")).unwrap();

    // Set while mounted (as the server does): the mount enforces it within about a second.
    maintenance::set_quota(&mount.config(), Some(64 * MIB)).unwrap();
    let (size, used, avail) = df(&mount);
    assert_eq!(size, 64 * MIB, "df shows the quota as the size");
    assert_eq!(used, 10 * MIB);
    assert_eq!(avail, 54 * MIB);
    std::thread::sleep(Duration::from_millis(1100));

    let big = mount.path("big");
    let (ok, _, stderr) = sh(&format!(
        "dd if=/dev/zero of='{}' bs=1M count=100 status=none",
        big.display()
    ));
    assert!(!ok, "dd past the quota succeeded");
    assert!(stderr.contains("Disk quota exceeded"), "{stderr}");
    let written = fs::metadata(&big).unwrap().len();
    assert!(
        (50 * MIB..=54 * MIB).contains(&written),
        "dd stopped at {written} bytes"
    );
    assert!(mount.used_bytes() <= 64 * MIB);
    let (_, _, avail) = df(&mount);
    assert!(avail < 4 * MIB, "{avail}");

    // Everything written before is intact and readable.
    assert_eq!(fs::read(mount.path("first")).unwrap(), first);
    assert!(read_at(&big, written - MIB, MIB as usize)
        .iter()
        .all(|&b| b == 0));

    // Deleting frees the space: writes work again.
    sh_ok(&format!("rm '{}'", big.display()));
    sh_ok(&format!(
        "dd if=/dev/zero of='{}' bs=1M count=20 status=none",
        mount.path("again").display()
    ));
    assert_eq!(mount.used_bytes(), 30 * MIB);

    // Removing the quota gives the virtual capacity back.
    maintenance::set_quota(&mount.config(), None).unwrap();
    eventually(Duration::from_secs(2), "df without the quota", || {
        df(&mount).0 >= 1 << 50
    });
}
