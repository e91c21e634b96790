//! Real bubblewrap sandboxes (needs root, bubblewrap, nsenter, setpriv).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

mod common;

use cellar_runner::{
    ExecRequest, Runner, RunnerConfig, RunnerError, SandboxSpec, EXEC_TIMEOUT_EXIT_CODE,
};
use tokio::io::AsyncReadExt;

fn runner(state: &common::StateDir) -> Runner {
    Runner::new(RunnerConfig {
        state_dir: state.path().to_owned(),
        cellar_bin: "/nonexistent/cellar".into(),
    })
    .expect("runner starts")
}

fn spec(id: &str) -> SandboxSpec {
    SandboxSpec {
        id: id.to_owned(),
        env: BTreeMap::from([("GREETING".to_owned(), "hello sandbox".to_owned())]),
        mounts: Vec::new(),
        cpu: 1,
        memory_gib: 1,
        network: cellar_runner::NetworkPolicy::Isolated,
    }
}

fn command(line: &str) -> ExecRequest {
    ExecRequest {
        command: line.to_owned(),
        ..ExecRequest::default()
    }
}

async fn run(runner: &Runner, id: &str, line: &str) -> (i32, String) {
    let result = runner.exec(id, command(line)).await.expect("exec runs");
    (result.exit_code, result.output)
}

#[tokio::test]
async fn exec_runs_as_sandbox_user_with_clean_env_and_own_pid_namespace() {
    // A secret in the runner's environment must never reach a sandbox.
    std::env::set_var("CELLAR_TEST_HOST_SECRET", "do-not-leak");
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner.create_sandbox(spec("sbx-basic")).await.unwrap();
    assert!(runner.is_running("sbx-basic"));

    assert_eq!(
        run(&runner, "sbx-basic", "echo hi; id -u").await,
        (0, "hi\n1000\n".into())
    );
    assert_eq!(
        run(&runner, "sbx-basic", "id -un; pwd").await.1,
        "daytona\n/home/daytona\n"
    );
    assert_eq!(
        run(&runner, "sbx-basic", "echo $GREETING").await.1,
        "hello sandbox\n"
    );
    let (_, env) = run(&runner, "sbx-basic", "env; cat /proc/1/environ").await;
    assert!(!env.contains("do-not-leak"), "host secret leaked: {env}");
    assert_eq!(run(&runner, "sbx-basic", "hostname").await.1, "sbx-basic\n");

    // Own PID namespace: only the sandbox's init, its sleep and this command are visible.
    let (_, pids) = run(&runner, "sbx-basic", "ls /proc | grep -c '^[0-9]'").await;
    let count: u32 = pids.trim().parse().unwrap();
    assert!(count <= 6, "sandbox sees {count} processes");

    // Exit codes, stderr, request env, cwd and positional arguments (never parsed by the shell).
    assert_eq!(
        run(&runner, "sbx-basic", "echo oops >&2; exit 3").await,
        (3, "oops\n".into())
    );
    let result = runner
        .exec(
            "sbx-basic",
            ExecRequest {
                command: r#"pwd && echo $EXTRA && echo $GREETING && printf '[%s]' "$@""#.into(),
                args: vec!["a b".into(), "$(id)".into(), "-n".into()],
                cwd: Some("/tmp".into()),
                env: BTreeMap::from([
                    ("EXTRA".to_owned(), "x y".to_owned()),
                    ("GREETING".to_owned(), "overridden".to_owned()),
                ]),
                timeout: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (result.exit_code, result.output.as_str()),
        (0, "/tmp\nx y\noverridden\n[a b][$(id)][-n]")
    );

    // The host's /etc is read-only and the runner's state is invisible.
    let (code, _) = run(&runner, "sbx-basic", "touch /etc/x").await;
    assert_ne!(code, 0);
    let (code, _) = run(
        &runner,
        "sbx-basic",
        &format!("ls {}", state.path().display()),
    )
    .await;
    assert_ne!(code, 0);
    // setuid binaries of the host do not grant root.
    let (_, out) = run(
        &runner,
        "sbx-basic",
        "su -c 'id -u' root </dev/null 2>&1; id -u",
    )
    .await;
    assert!(out.ends_with("1000\n"), "{out}");
    assert!(!out.starts_with("0\n"), "{out}");

    // Limits: the sandbox's processes sit in its cgroup (v1 cpu+memory or v2), 1 GiB of memory.
    let (_, cgroups) = run(&runner, "sbx-basic", "cat /proc/self/cgroup").await;
    assert!(cgroups.contains("/cellar/sbx-basic"), "{cgroups}");
    let memory_limit = [
        "/sys/fs/cgroup/cellar/sbx-basic/memory.max",
        "/sys/fs/cgroup/memory/cellar/sbx-basic/memory.limit_in_bytes",
    ]
    .iter()
    .find_map(|file| std::fs::read_to_string(file).ok())
    .expect("memory limit file");
    assert_eq!(memory_limit.trim(), (1u64 << 30).to_string());

    runner.release_all().await;
    assert!(!runner.is_running("sbx-basic"));
    assert!(matches!(
        runner.exec("sbx-basic", command("true")).await,
        Err(RunnerError::NotFound(_))
    ));
}

#[tokio::test]
async fn exec_timeout_kills_the_command_and_keeps_output() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner.create_sandbox(spec("sbx-timeout")).await.unwrap();
    let started = Instant::now();
    let result = runner
        .exec(
            "sbx-timeout",
            ExecRequest {
                command: "echo before; sleep 30 & sleep 30; echo after".into(),
                timeout: Some(Duration::from_millis(500)),
                ..ExecRequest::default()
            },
        )
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(result.exit_code, EXEC_TIMEOUT_EXIT_CODE);
    assert_eq!(result.output, "before\n");
    // The whole process group died, the background sleep included.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, sleeps) = run(
        &runner,
        "sbx-timeout",
        "ps -eo args | grep -c '^sleep 30' || true",
    )
    .await;
    assert_eq!(sleeps.trim(), "0");

    // A command that leaves a background process behind still returns promptly.
    let started = Instant::now();
    assert_eq!(
        run(&runner, "sbx-timeout", "sleep 20 & echo done").await,
        (0, "done\n".into())
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    runner.release_all().await;
}

#[tokio::test]
async fn upload_and_download_round_trip() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner.create_sandbox(spec("sbx-files")).await.unwrap();
    let data: Vec<u8> = (0..5u32 << 20).map(|i| (i * 7 + i / 4093) as u8).collect();
    runner
        .upload("sbx-files", "dir/sub/data.bin", &data[..])
        .await
        .unwrap();
    let (_, owner) = run(&runner, "sbx-files", "stat -c %u:%s dir/sub/data.bin").await;
    assert_eq!(owner.trim(), format!("1000:{}", data.len()));
    let mut stream = runner
        .download("sbx-files", "/home/daytona/dir/sub/data.bin")
        .await
        .unwrap();
    let mut back = Vec::new();
    stream.read_to_end(&mut back).await.unwrap();
    assert!(back == data, "downloaded file differs");

    // Missing files and directories are reported before streaming.
    assert!(matches!(
        runner.download("sbx-files", "/nope").await,
        Err(RunnerError::NotFound(_))
    ));
    assert!(matches!(
        runner.download("sbx-files", "/home/daytona/dir").await,
        Err(RunnerError::InvalidInput(_))
    ));
    // Writing where the sandbox user may not fails.
    assert!(runner
        .upload("sbx-files", "/etc/evil", &b"x"[..])
        .await
        .is_err());
    // A symlink to a host path resolves inside the sandbox's root.
    run(&runner, "sbx-files", "ln -s /etc/shadow link").await;
    assert!(runner.download("sbx-files", "link").await.is_err());
    runner.release_all().await;
}

#[tokio::test]
async fn destroy_kills_every_process_and_is_idempotent() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner.create_sandbox(spec("sbx-destroy")).await.unwrap();
    run(
        &runner,
        "sbx-destroy",
        "nohup sleep 1000 >/dev/null 2>&1 & echo started",
    )
    .await;
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.path().join("sandboxes/sbx-destroy.json")).unwrap(),
    )
    .unwrap();
    let init_pid = record["init_pid"].as_i64().unwrap();
    let sandbox_pids = descendants(init_pid as i32);
    assert!(sandbox_pids.len() >= 2, "{sandbox_pids:?}");
    runner.destroy_sandbox("sbx-destroy").await.unwrap();
    for pid in sandbox_pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "pid {pid} survived: {stat}"
        );
    }
    assert!(!runner.is_running("sbx-destroy"));
    assert!(!state.path().join("sandboxes/sbx-destroy").exists());
    runner.destroy_sandbox("sbx-destroy").await.unwrap();
}

fn descendants(pid: i32) -> Vec<i32> {
    let mut all = vec![pid];
    let mut i = 0;
    while i < all.len() {
        let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", all[i]))
            .unwrap_or_default();
        all.extend(
            children
                .split_whitespace()
                .filter_map(|c| c.parse::<i32>().ok()),
        );
        i += 1;
    }
    all
}

#[tokio::test]
async fn sandbox_survives_a_runner_restart() {
    let state = common::StateDir::new();
    {
        let first = runner(&state);
        first.create_sandbox(spec("sbx-restart")).await.unwrap();
        run(&first, "sbx-restart", "echo kept > note").await;
    }
    let second = runner(&state);
    assert!(second.is_running("sbx-restart"));
    assert_eq!(
        run(&second, "sbx-restart", "cat note").await,
        (0, "kept\n".into())
    );
    second.destroy_sandbox("sbx-restart").await.unwrap();

    // A runner started after the sandbox died cleans its leftovers up.
    let third = runner(&state);
    assert!(!third.is_running("sbx-restart"));
    assert!(!state.path().join("sandboxes/sbx-restart.json").exists());
}

#[tokio::test]
async fn invalid_specs_are_rejected() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    for id in ["", "../x", "a/b", ".hidden"] {
        assert!(matches!(
            runner.create_sandbox(spec(id)).await,
            Err(RunnerError::InvalidInput(_))
        ));
    }
    let mut bad_env = spec("sbx-env");
    bad_env.env.insert("A=B".into(), "x".into());
    assert!(matches!(
        runner.create_sandbox(bad_env).await,
        Err(RunnerError::InvalidInput(_))
    ));
}

/// The server shares one Runner between axum handlers: it and its futures must be Send (+ Sync).
#[test]
fn runner_and_its_futures_are_thread_safe() {
    fn assert_send<T: Send>(_: &T) {}
    fn assert_sync<T: Send + Sync>() {}
    fn check(runner: &Runner) {
        assert_send(&runner.create_sandbox(spec("x")));
        assert_send(&runner.destroy_sandbox("x"));
        assert_send(&runner.exec("x", command("true")));
        assert_send(&runner.upload("x", "f", &b""[..]));
        assert_send(&runner.download("x", "f"));
        assert_send(&runner.release_all());
    }
    assert_sync::<Runner>();
    let _ = check as fn(&Runner);
    fn assert_stream<T: tokio::io::AsyncRead + Send + Unpin + 'static>() {}
    assert_stream::<cellar_runner::FileStream>();
}

#[tokio::test]
async fn the_user_cannot_end_the_sandbox_and_a_dead_one_can_be_recreated() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner.create_sandbox(spec("sbx-killall")).await.unwrap();
    run(&runner, "sbx-killall", "nohup sleep 1000 >/dev/null 2>&1 &").await;
    // Signals every process the user may signal (all but the caller).
    run(&runner, "sbx-killall", "kill -9 -1").await;
    assert!(runner.is_running("sbx-killall"));
    let (_, left) = run(&runner, "sbx-killall", "ps -eo user:12,args").await;
    assert!(!left.contains("sleep 1000"), "{left}");
    assert_eq!(run(&runner, "sbx-killall", "echo alive").await.1, "alive\n");

    // Killed from outside: no longer running, and creating it again starts a fresh one.
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(state.path().join("sandboxes/sbx-killall.json")).unwrap(),
    )
    .unwrap();
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(record["init_pid"].as_i64().unwrap() as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while runner.is_running("sbx-killall") {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    runner.create_sandbox(spec("sbx-killall")).await.unwrap();
    assert_eq!(run(&runner, "sbx-killall", "echo again").await.1, "again\n");
    runner.release_all().await;
}
