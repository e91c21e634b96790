//! Volumes mounted into real sandboxes through real FUSE mounts (`cellar mount`). Needs root,
//! bubblewrap, /dev/fuse and the cellar binary (CELLAR_BIN or target/debug/cellar).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod common;

use cellar_runner::{
    ExecRequest, Runner, RunnerConfig, RunnerError, SandboxSpec, VolumeMountSpec, VolumeSource,
};

const STORE_SECRET: &str = "store-secret-never-in-a-sandbox";

fn cellar_bin() -> PathBuf {
    let path = std::env::var_os("CELLAR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/cellar"));
    assert!(
        path.is_file(),
        "cellar binary not found at {} (build it with `cargo build -p cellar-cli` or set CELLAR_BIN)",
        path.display()
    );
    path
}

/// A runner plus one volume (SQLite metadata, file:// store) in temporary directories.
struct Fixture {
    state: common::StateDir,
    data: tempfile::TempDir,
    runner: Runner,
}

impl Fixture {
    fn new() -> Fixture {
        let state = common::StateDir::new();
        let data = tempfile::tempdir().unwrap();
        std::fs::create_dir(data.path().join("blocks")).unwrap();
        let runner = Fixture::runner_for(&state);
        Fixture {
            state,
            data,
            runner,
        }
    }

    fn runner_for(state: &common::StateDir) -> Runner {
        Runner::new(RunnerConfig {
            state_dir: state.path().to_owned(),
            cellar_bin: cellar_bin(),
        })
        .unwrap()
    }

    fn volume(&self) -> VolumeSource {
        VolumeSource {
            volume_id: "vol-1".into(),
            meta_url: format!("sqlite://{}/meta.db", self.data.path().display()),
            store_url: format!("file://{}/blocks", self.data.path().display()),
            volume_name: "shared".into(),
            store_env: vec![("CELLAR_TEST_STORE_SECRET".into(), STORE_SECRET.into())],
        }
    }

    fn mount_point(&self) -> PathBuf {
        self.state
            .path()
            .canonicalize()
            .unwrap()
            .join("mounts/vol-1")
    }

    fn spec(
        &self,
        id: &str,
        mount_path: &str,
        subpath: Option<&str>,
        read_only: bool,
    ) -> SandboxSpec {
        SandboxSpec {
            id: id.into(),
            env: BTreeMap::new(),
            mounts: vec![VolumeMountSpec {
                volume: self.volume(),
                mount_path: mount_path.into(),
                subpath: subpath.map(str::to_owned),
                read_only,
            }],
            cpu: 0,
            memory_gib: 0,
            network: cellar_runner::NetworkPolicy::Isolated,
        }
    }

    async fn run(&self, id: &str, line: &str) -> (i32, String) {
        let result = self
            .runner
            .exec(
                id,
                ExecRequest {
                    command: line.into(),
                    ..ExecRequest::default()
                },
            )
            .await
            .unwrap();
        (result.exit_code, result.output)
    }
}

fn fuse_mounts_at(mount_point: &Path) -> usize {
    let wanted = mount_point.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|line| line.split(' ').nth(4) == Some(wanted.as_str()))
        .count()
}

#[tokio::test]
async fn sandboxes_share_a_volume_through_one_mount() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("vol-a", "/home/daytona/volume", None, false))
        .await
        .unwrap();
    fx.runner
        .create_sandbox(fx.spec("vol-b", "/data/shared", None, false))
        .await
        .unwrap();
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);

    assert_eq!(
        fx.run(
            "vol-a",
            "echo from-a > volume/note && mkdir -p volume/dir && echo ok"
        )
        .await,
        (0, "ok\n".into())
    );
    assert_eq!(
        fx.run("vol-b", "cat /data/shared/note").await,
        (0, "from-a\n".into())
    );
    assert_eq!(
        fx.run("vol-b", "stat -c %u /data/shared/note").await.1,
        "1000\n"
    );

    // No credential reaches the sandbox: not in the environment of any process it can see,
    // not in the mount table (the FUSE source is cellar:<volume>).
    let (_, seen) = fx
        .run(
            "vol-a",
            "cat /proc/*/environ /proc/self/mountinfo 2>/dev/null | tr '\\0' '\\n'",
        )
        .await;
    assert!(!seen.contains(STORE_SECRET));
    assert!(!seen.contains("meta.db"), "{seen}");
    assert!(seen.contains("cellar:shared"), "{seen}");

    // The mount stays while a sandbox uses it, and goes with the last one.
    fx.runner.destroy_sandbox("vol-a").await.unwrap();
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);
    assert_eq!(fx.run("vol-b", "cat /data/shared/note").await.0, 0);
    fx.runner.destroy_sandbox("vol-b").await.unwrap();
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
    assert!(!fx.state.path().join("mounts/vol-1.json").exists());

    // The data outlives the sandboxes and the mount.
    fx.runner
        .create_sandbox(fx.spec("vol-c", "/v", None, false))
        .await
        .unwrap();
    assert_eq!(fx.run("vol-c", "cat /v/note").await, (0, "from-a\n".into()));
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

#[tokio::test]
async fn read_only_mounts_are_enforced_by_the_kernel() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("ro-writer", "/v", None, false))
        .await
        .unwrap();
    fx.runner
        .create_sandbox(fx.spec("ro-reader", "/v", None, true))
        .await
        .unwrap();
    fx.run("ro-writer", "echo data > /v/file").await;
    assert_eq!(
        fx.run("ro-reader", "cat /v/file").await,
        (0, "data\n".into())
    );
    let (code, output) = fx.run("ro-reader", "echo x > /v/other").await;
    assert_ne!(code, 0);
    assert!(output.contains("Read-only file system"), "{output}");
    let (code, output) = fx.run("ro-reader", "rm /v/file").await;
    assert_ne!(code, 0);
    assert!(output.contains("Read-only file system"), "{output}");
    fx.runner.release_all().await;
}

#[tokio::test]
async fn subpaths_cannot_be_escaped() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("sub-root", "/v", None, false))
        .await
        .unwrap();
    fx.run(
        "sub-root",
        "echo top-secret > /v/outside && ln -s / /v/to-root && ln -s ../.. /v/up",
    )
    .await;

    fx.runner
        .create_sandbox(fx.spec(
            "sub-inner",
            "/home/daytona/work",
            Some("projects/one"),
            false,
        ))
        .await
        .unwrap();
    // The subpath was created, owned by the sandbox user, and is all the sandbox sees.
    assert_eq!(
        fx.run("sub-inner", "echo mine > work/file && ls -A work")
            .await,
        (0, "file\n".into())
    );
    assert_eq!(
        fx.run("sub-root", "cat /v/projects/one/file").await,
        (0, "mine\n".into())
    );
    let (_, out) = fx
        .run(
            "sub-inner",
            "cat work/../outside work/../../outside 2>&1; ls work/..",
        )
        .await;
    assert!(!out.contains("top-secret"), "{out}");
    // Symlinks planted in the volume resolve inside the sandbox root, not the volume or host.
    fx.run(
        "sub-root",
        "ln -s / /v/projects/one/abs && ln -s ../../.. /v/projects/one/rel",
    )
    .await;
    let (_, out) = fx
        .run(
            "sub-inner",
            "cat work/abs/outside work/rel/outside work/abs/v/outside 2>&1",
        )
        .await;
    assert!(!out.contains("top-secret"), "{out}");

    // A subpath through a symlink (to / or upwards) or with `..` is refused.
    for subpath in ["to-root/etc", "up", "projects/../.."] {
        let result = fx
            .runner
            .create_sandbox(fx.spec("sub-evil", "/v", Some(subpath), false))
            .await;
        assert!(
            matches!(result, Err(RunnerError::InvalidInput(_))),
            "{subpath}: {result:?}"
        );
        assert!(!fx.runner.is_running("sub-evil"));
    }
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

#[tokio::test]
async fn mounts_survive_a_runner_restart() {
    let mut fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("restart-a", "/v", None, false))
        .await
        .unwrap();
    fx.run("restart-a", "echo before > /v/file").await;
    fx.runner = Fixture::runner_for(&fx.state);
    assert!(fx.runner.is_running("restart-a"));
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);
    assert_eq!(
        fx.run("restart-a", "cat /v/file").await,
        (0, "before\n".into())
    );
    // A new sandbox joins the existing mount rather than mounting again.
    fx.runner
        .create_sandbox(fx.spec("restart-b", "/v", None, false))
        .await
        .unwrap();
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

/// The `cellar mount` daemon serving `mount_point` (found by its command line).
fn daemon_pid(mount_point: &Path) -> i32 {
    let wanted = mount_point.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|byte| *byte == 0).collect();
            args.first().is_some_and(|arg0| arg0.ends_with(b"cellar"))
                && args.contains(&b"mount".as_slice())
                && args.contains(&wanted.as_bytes())
        })
        .unwrap_or_else(|| panic!("no mount daemon for {wanted}"))
}

#[tokio::test]
async fn a_dead_mount_daemon_is_replaced_on_restart() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("dead-a", "/v", None, false))
        .await
        .unwrap();
    fx.run("dead-a", "echo durable > /v/file").await;
    // The runner stops (its sandboxes and mounts run on), then the daemon dies.
    let Fixture {
        state,
        data,
        runner,
    } = fx;
    drop(runner);
    let mount_point = state.path().canonicalize().unwrap().join("mounts/vol-1");
    let pid = daemon_pid(&mount_point);
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&mount_point).is_ok() {
        assert!(std::time::Instant::now() < deadline, "mount still answers");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let runner = Fixture::runner_for(&state);
    let fx = Fixture {
        state,
        data,
        runner,
    };
    assert!(fx.runner.is_running("dead-a"));
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);
    assert!(
        std::fs::metadata(fx.mount_point()).is_ok(),
        "mount not live again"
    );
    // The sandbox started before the crash sees the volume again.
    assert_eq!(
        fx.run("dead-a", "cat /v/file").await,
        (0, "durable\n".into())
    );
    fx.runner
        .create_sandbox(fx.spec("dead-b", "/v", None, false))
        .await
        .unwrap();
    assert_eq!(
        fx.run("dead-b", "cat /v/file").await,
        (0, "durable\n".into())
    );
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

#[tokio::test]
async fn a_dead_mount_daemon_is_replaced_while_its_sandboxes_run() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("orphaned", "/v", Some("dir"), false))
        .await
        .unwrap();
    fx.run("orphaned", "echo kept > /v/file").await;
    let pid = daemon_pid(&fx.mount_point());
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    // Nothing asks the runner: it notices the dead mount by itself and renews the bind.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, output) = fx.run("orphaned", "cat /v/file").await;
        if code == 0 {
            assert_eq!(output, "kept\n");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the volume stays dead: {output}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_ne!(daemon_pid(&fx.mount_point()), pid);
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 1);
    assert_eq!(
        fx.run("orphaned", "echo again >> /v/file && cat /v/file")
            .await,
        (0, "kept\nagain\n".into())
    );
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

#[tokio::test]
async fn a_dead_mount_is_replaced_when_the_next_sandbox_needs_it() {
    let fx = Fixture::new();
    fx.runner
        .create_sandbox(fx.spec("crash-rw", "/v", Some("dir"), false))
        .await
        .unwrap();
    fx.runner
        .create_sandbox(fx.spec("crash-ro", "/v", Some("dir"), true))
        .await
        .unwrap();
    fx.run("crash-rw", "echo kept > /v/file").await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(daemon_pid(&fx.mount_point()), libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(fx.mount_point()).is_ok() {
        assert!(std::time::Instant::now() < deadline, "mount still answers");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    fx.runner
        .create_sandbox(fx.spec("crash-new", "/v", None, false))
        .await
        .unwrap();
    assert_eq!(
        fx.run("crash-new", "cat /v/dir/file").await,
        (0, "kept\n".into())
    );
    assert_eq!(
        fx.run("crash-ro", "cat /v/file").await,
        (0, "kept\n".into())
    );
    let (code, output) = fx.run("crash-ro", "echo x > /v/other").await;
    assert!(
        code != 0 && output.contains("Read-only file system"),
        "{output}"
    );
    assert_eq!(
        fx.run("crash-rw", "echo again >> /v/file && cat /v/file")
            .await,
        (0, "kept\nagain\n".into())
    );
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}

#[tokio::test]
async fn a_volume_unmounts_while_other_sandboxes_run() {
    let fx = Fixture::new();
    let mut other = fx.volume();
    other.volume_id = "vol-2".into();
    other.volume_name = "other".into();
    other.meta_url = format!("sqlite://{}/meta2.db", fx.data.path().display());
    let mut uses_other = fx.spec("cross-other", "/o", None, false);
    uses_other.mounts[0].volume = other;
    fx.runner.create_sandbox(uses_other).await.unwrap();
    // Created while vol-2 is mounted: its mount namespace started as a copy of the host's.
    fx.runner
        .create_sandbox(fx.spec("cross-main", "/v", None, false))
        .await
        .unwrap();
    let other_mount = fx.mount_point().with_file_name("vol-2");
    assert_eq!(fuse_mounts_at(&other_mount), 1);
    fx.runner.destroy_sandbox("cross-other").await.unwrap();
    assert_eq!(fuse_mounts_at(&other_mount), 0);
    assert_eq!(
        fx.run("cross-main", "echo ok > /v/f && cat /v/f").await,
        (0, "ok\n".into())
    );
    let (_, mounts) = fx.run("cross-main", "cat /proc/self/mountinfo").await;
    assert!(!mounts.contains("cellar:other"), "{mounts}");
    fx.runner.release_all().await;
}

#[tokio::test]
async fn a_renewed_bind_never_follows_a_symlink_the_sandbox_planted() {
    let fx = Fixture::new();
    // The mount path's parent belongs to the user: once the mount is dead, the user moves it
    // away and puts a link to /etc in its place, hoping the renewed bind lands on /etc/ssl.
    fx.runner
        .create_sandbox(fx.spec("planter", "/home/daytona/evil/ssl", None, false))
        .await
        .unwrap();
    fx.run("planter", "echo mine > evil/ssl/marker").await;
    let before = fx.run("planter", "ls /etc/ssl").await;
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(daemon_pid(&fx.mount_point()), libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(fx.mount_point()).is_ok() {
        assert!(std::time::Instant::now() < deadline, "mount still answers");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        fx.run(
            "planter",
            "mv evil evil.old && ln -s /etc evil && readlink evil"
        )
        .await,
        (0, "/etc\n".into())
    );
    // The next sandbox needing the volume replaces the dead mount and renews the others' binds.
    fx.runner
        .create_sandbox(fx.spec("next", "/v", None, false))
        .await
        .unwrap();
    assert_eq!(fx.run("next", "cat /v/marker").await, (0, "mine\n".into()));
    assert_eq!(
        fx.run("planter", "ls /etc/ssl").await,
        before,
        "the volume was mounted over the sandbox's /etc/ssl"
    );
    fx.runner.release_all().await;
    assert_eq!(fuse_mounts_at(&fx.mount_point()), 0);
}
