//! Sandbox isolation with real sandboxes: each has its own network namespace (outbound through
//! pasta, to a "test host" that is a network namespace on a veth pair made here, never to the
//! host itself), and a seccomp filter. Needs root, bubblewrap, pasta (passt), iproute2.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use cellar_runner::{ExecRequest, NetworkPolicy, Runner, RunnerConfig, SandboxSpec};

fn runner(state: &common::StateDir) -> Runner {
    Runner::new(RunnerConfig {
        state_dir: state.path().to_owned(),
        cellar_bin: "/nonexistent/cellar".into(),
    })
    .expect("runner starts")
}

fn spec(id: &str, network: NetworkPolicy) -> SandboxSpec {
    SandboxSpec {
        id: id.to_owned(),
        env: BTreeMap::new(),
        mounts: Vec::new(),
        cpu: 0,
        memory_gib: 0,
        network,
    }
}

fn outbound() -> NetworkPolicy {
    NetworkPolicy::Outbound { allow: Vec::new() }
}

async fn run(runner: &Runner, id: &str, line: &str) -> (i32, String) {
    let result = runner
        .exec(
            id,
            ExecRequest {
                command: line.to_owned(),
                timeout: Some(Duration::from_secs(20)),
                ..ExecRequest::default()
            },
        )
        .await
        .expect("exec runs");
    (result.exit_code, result.output)
}

/// Connects from inside the sandbox; `Ok(greeting)` or `Err(what python said)`.
async fn connect_from(runner: &Runner, id: &str, addr: SocketAddr) -> Result<String, String> {
    let script = format!(
        "import socket; s = socket.create_connection(('{}', {}), timeout=3); \
         print(s.recv(64).decode().strip())",
        addr.ip(),
        addr.port()
    );
    let (code, output) = run(runner, id, &format!("python3 -c \"{script}\" 2>&1")).await;
    if code == 0 {
        Ok(output.trim().to_owned())
    } else {
        Err(output.lines().last().unwrap_or_default().to_owned())
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip runs");
    assert!(status.success(), "ip {args:?} failed");
}

/// A TCP server in this (the host's) network namespace that greets every connection.
fn serve_on_host(addr: &str, greeting: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(addr).expect("bind");
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.write_all(greeting.as_bytes());
        }
    });
    local
}

/// Another "host" on the network: a network namespace joined to the host by a veth pair, with
/// the host's end `10.231.N.1/30` and its own `10.231.N.2/30`, serving a greeting on port 8000.
struct TestHost {
    name: String,
    host_end: String,
    server: Child,
    host_addr: IpAddr,
    server_addr: SocketAddr,
}

impl TestHost {
    fn new(n: u8) -> TestHost {
        let name = format!("cellar-th{}-{n}", std::process::id());
        let host_end = format!("cth{n}h{}", std::process::id() % 10000);
        let peer_end = format!("cth{n}t{}", std::process::id() % 10000);
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_end, "type", "veth", "peer", "name", &peer_end,
        ]);
        ip(&["link", "set", &peer_end, "netns", &name]);
        ip(&["addr", "add", &format!("10.231.{n}.1/30"), "dev", &host_end]);
        ip(&["link", "set", &host_end, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("10.231.{n}.2/30"),
            "dev",
            &peer_end,
        ]);
        ip(&["-n", &name, "link", "set", &peer_end, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let server_addr: SocketAddr = format!("10.231.{n}.2:8000").parse().unwrap();
        let script = format!(
            "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
             s.bind(('{}', 8000))\ns.listen()\nprint('ready', flush=True)\n\
             while True:\n    c, _ = s.accept()\n    c.sendall(b'hello from the test host')\n    c.close()\n",
            server_addr.ip()
        );
        let mut server = Command::new("ip")
            .args(["netns", "exec", &name, "python3", "-c", &script])
            .stdout(Stdio::piped())
            .spawn()
            .expect("test host server starts");
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(server.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready");
        TestHost {
            name,
            host_end,
            server,
            host_addr: format!("10.231.{n}.1").parse().unwrap(),
            server_addr,
        }
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_end])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The host's own IPv4 addresses (other than loopback), from `ip -4 -o addr`.
fn host_ipv4_addresses() -> Vec<IpAddr> {
    let output = Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let cidr = line.split_whitespace().nth(3)?;
            cidr.split('/').next()?.parse::<IpAddr>().ok()
        })
        .filter(|addr| !addr.is_loopback())
        .collect()
}

#[tokio::test]
async fn a_default_sandbox_reaches_other_hosts_but_not_the_host() {
    let test_host = TestHost::new(1);
    // The addresses the host has when the sandbox starts (other tests add theirs meanwhile; the
    // ones gained later are the next test's subject).
    let host_addrs = host_ipv4_addresses();
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner
        .create_sandbox(spec("net-default", outbound()))
        .await
        .unwrap();

    assert_eq!(
        connect_from(&runner, "net-default", test_host.server_addr).await,
        Ok("hello from the test host".to_owned()),
        "outbound traffic goes through the user-mode stack"
    );
    let on_loopback = serve_on_host("127.0.0.1:0", "host loopback");
    let on_all = serve_on_host("0.0.0.0:0", "host service");
    assert!(connect_from(&runner, "net-default", on_loopback)
        .await
        .is_err());
    assert!(host_addrs.contains(&test_host.host_addr), "{host_addrs:?}");
    for addr in host_addrs {
        let target = SocketAddr::new(addr, on_all.port());
        let reached = connect_from(&runner, "net-default", target).await;
        assert!(
            reached.is_err(),
            "the host's own {addr} is reachable: {reached:?}"
        );
    }
    // The host does not see the sandbox's interfaces either.
    let (_, interfaces) = run(&runner, "net-default", "cat /proc/net/dev").await;
    assert!(!interfaces.contains(&test_host.host_end), "{interfaces}");
    runner.destroy_sandbox("net-default").await.unwrap();
}

#[tokio::test]
async fn a_port_opened_in_one_sandbox_is_reachable_from_no_other() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    for id in ["net-server", "net-client"] {
        runner.create_sandbox(spec(id, outbound())).await.unwrap();
    }
    let port = 18231;
    let server = format!(
        "nohup python3 -c \"import socket\ns = socket.socket()\ns.bind(('0.0.0.0', {port}))\n\
         s.listen()\nwhile True:\n    c, _ = s.accept(); c.sendall(b'sandbox port'); c.close()\" \
         >/dev/null 2>&1 &"
    );
    assert_eq!(run(&runner, "net-server", &server).await.0, 0);
    let own: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_from(&runner, "net-server", own).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the sandbox's own server never listened"
        );
    }
    assert!(connect_from(&runner, "net-client", own).await.is_err());
    for addr in host_ipv4_addresses() {
        let target = SocketAddr::new(addr, port);
        assert!(connect_from(&runner, "net-client", target).await.is_err());
        assert!(std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)).is_err());
    }
    assert!(std::net::TcpStream::connect_timeout(&own, Duration::from_secs(2)).is_err());
    runner.release_all().await;
}

#[tokio::test]
async fn block_all_and_allow_lists_are_honoured() {
    let test_host = TestHost::new(2);
    let state = common::StateDir::new();
    let runner = runner(&state);
    let allowed = NetworkPolicy::Outbound {
        allow: vec!["10.231.2.0/30".parse().unwrap()],
    };
    let elsewhere = NetworkPolicy::Outbound {
        allow: vec![
            "10.99.0.0/16".parse().unwrap(),
            "fd99::/64".parse().unwrap(),
        ],
    };
    runner
        .create_sandbox(spec("net-none", NetworkPolicy::Isolated))
        .await
        .unwrap();
    runner
        .create_sandbox(spec("net-allowed", allowed))
        .await
        .unwrap();
    runner
        .create_sandbox(spec("net-elsewhere", elsewhere))
        .await
        .unwrap();

    assert!(connect_from(&runner, "net-none", test_host.server_addr)
        .await
        .is_err());
    let (_, interfaces) = run(
        &runner,
        "net-none",
        "tail -n +3 /proc/net/dev | cut -d: -f1",
    )
    .await;
    assert_eq!(interfaces.split_whitespace().collect::<Vec<_>>(), ["lo"]);
    assert_eq!(
        connect_from(&runner, "net-allowed", test_host.server_addr).await,
        Ok("hello from the test host".to_owned())
    );
    let refused = connect_from(&runner, "net-elsewhere", test_host.server_addr).await;
    assert!(refused.is_err(), "{refused:?}");
    // Allowing a network never opens the host's own address in it.
    let on_all = serve_on_host("0.0.0.0:0", "host service");
    let host_end = SocketAddr::new(test_host.host_addr, on_all.port());
    assert!(connect_from(&runner, "net-allowed", host_end)
        .await
        .is_err());
    runner.release_all().await;
}

#[tokio::test]
async fn addresses_the_host_gains_later_are_unreachable_too() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner
        .create_sandbox(spec("net-later", outbound()))
        .await
        .unwrap();
    let dummy = format!("cnew{}", std::process::id() % 100000);
    let peer = format!("cnewp{}", std::process::id() % 100000);
    ip(&["link", "add", &dummy, "type", "veth", "peer", "name", &peer]);
    ip(&["addr", "add", "10.232.7.1/32", "dev", &dummy]);
    ip(&["link", "set", &dummy, "up"]);
    let on_all = serve_on_host("0.0.0.0:0", "host service");
    let target: SocketAddr = format!("10.232.7.1:{}", on_all.port()).parse().unwrap();
    // The runner hears of the new address from the kernel at once; give it a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reached = connect_from(&runner, "net-later", target).await;
    let _ = Command::new("ip").args(["link", "del", &dummy]).status();
    assert!(
        reached.is_err(),
        "a new host address is reachable: {reached:?}"
    );
    runner.release_all().await;
}

/// The pids of the processes whose command line names `netns` (the sandbox's pasta).
fn pastas_of(netns: &std::path::Path) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read(entry.path().join("cmdline")).is_ok_and(|cmdline| {
                String::from_utf8_lossy(&cmdline).contains(&*netns.to_string_lossy())
            })
        })
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

fn netns_file(state: &common::StateDir, id: &str) -> std::path::PathBuf {
    let dir = state.path().canonicalize().unwrap();
    dir.join(format!("sandboxes/{id}.netns"))
}

#[tokio::test]
async fn pasta_ends_with_its_sandbox() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner
        .create_sandbox(spec("net-end", outbound()))
        .await
        .unwrap();
    let netns = netns_file(&state, "net-end");
    assert_eq!(pastas_of(&netns).len(), 1, "one pasta per outbound sandbox");
    runner.destroy_sandbox("net-end").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pastas_of(&netns).is_empty() {
        assert!(Instant::now() < deadline, "pasta outlived its sandbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!netns.exists());
}

#[tokio::test]
async fn a_runner_reconnects_an_adopted_sandbox_whose_pasta_died() {
    let test_host = TestHost::new(3);
    let state = common::StateDir::new();
    let allowed = NetworkPolicy::Outbound {
        allow: vec!["10.231.3.0/30".parse().unwrap()],
    };
    {
        let first = runner(&state);
        first
            .create_sandbox(spec("net-again", allowed))
            .await
            .unwrap();
    }
    let netns = netns_file(&state, "net-again");
    for pid in pastas_of(&netns) {
        // SAFETY: kill(2) has no memory-safety preconditions.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !pastas_of(&netns).is_empty() {
        assert!(Instant::now() < deadline, "pasta did not die");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let second = runner(&state);
    assert_eq!(
        connect_from(&second, "net-again", test_host.server_addr).await,
        Ok("hello from the test host".to_owned())
    );
    // The allow list holds again too.
    let elsewhere: SocketAddr = "10.99.0.1:80".parse().unwrap();
    assert!(connect_from(&second, "net-again", elsewhere).await.is_err());
    second.release_all().await;
}

#[tokio::test]
async fn sandbox_processes_cannot_create_user_namespaces_or_use_the_keyring() {
    let state = common::StateDir::new();
    let runner = runner(&state);
    runner
        .create_sandbox(spec("sec", NetworkPolicy::Isolated))
        .await
        .unwrap();

    let (code, output) = run(&runner, "sec", "unshare --user --map-root-user id -u 2>&1").await;
    assert_ne!(code, 0, "a user namespace was created: {output}");
    assert!(output.contains("Operation not permitted"), "{output}");
    let python = |snippet: &str| format!("python3 -c \"{snippet}\" 2>&1");
    let (_, output) = run(
        &runner,
        "sec",
        &python(&format!(
            "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             r = libc.unshare({})\nprint(r, ctypes.get_errno())",
            libc::CLONE_NEWUSER
        )),
    )
    .await;
    assert_eq!(output.trim(), format!("-1 {}", libc::EPERM));
    // keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 1)
    let (_, output) = run(
        &runner,
        "sec",
        &python(&format!(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n\
             r = libc.syscall({}, 0, -4, 1)\nprint(r, ctypes.get_errno())",
            libc::SYS_keyctl
        )),
    )
    .await;
    assert_eq!(output.trim(), format!("-1 {}", libc::EPERM));
    // What code does need still works: threads (clone3 falls back to clone) and processes.
    let (code, output) = run(
        &runner,
        "sec",
        &python("import threading\nt = threading.Thread(target=print, args=('thread',))\nt.start(); t.join()"),
    )
    .await;
    assert_eq!((code, output.trim()), (0, "thread"));
    let (code, output) = run(&runner, "sec", "sh -c 'echo child' | cat").await;
    assert_eq!((code, output.trim()), (0, "child"));
    runner.destroy_sandbox("sec").await.unwrap();
}
