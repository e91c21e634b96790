//! `cellar runner` processes on loopback, each with its own data directory: runners on "other
//! hosts" of a test server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::TestServer;

/// A `cellar runner` process.
pub struct RunnerProcess {
    pub name: String,
    pub dir: PathBuf,
    pub port: u16,
    token: String,
    server: String,
    pub child: Child,
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RunnerProcess {
    pub fn start(server: &TestServer, name: &str, token: &str, dir: &Path) -> RunnerProcess {
        let (name, dir, port) = (name.to_string(), dir.to_path_buf(), free_port());
        let (token, server) = (token.to_string(), server.base.clone());
        let child = spawn_runner(&name, &dir, port, &token, &server);
        RunnerProcess {
            name,
            dir,
            port,
            token,
            server,
            child,
        }
    }

    pub fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn restart(&mut self) {
        self.child = spawn_runner(&self.name, &self.dir, self.port, &self.token, &self.server);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("runner.log")).unwrap_or_default()
    }

    /// Whether the runner still keeps a record of the sandbox (it runs it).
    pub fn holds(&self, sandbox_id: &str) -> bool {
        self.dir
            .join("runner/sandboxes")
            .join(format!("{sandbox_id}.json"))
            .exists()
    }
}

fn spawn_runner(name: &str, dir: &Path, port: u16, token: &str, server: &str) -> Child {
    let bin = super::cellar_bin();
    assert!(bin.is_file(), "no cellar binary at {}", bin.display());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("runner.log"))
        .unwrap();
    Command::new(bin)
        .args(["runner", "--server", server, "--name", name])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(dir)
        // The token travels in the environment, never on the command line.
        .env("CELLAR_RUNNER_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

impl Drop for RunnerProcess {
    fn drop(&mut self) {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Waits until the server lists every runner of `names` in `state`.
pub async fn wait_for_runners(server: &TestServer, names: &[&str], state: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let runners = server.admin(cellar_server::admin_list_runners).unwrap();
        let ready = names.iter().all(|name| {
            runners
                .iter()
                .any(|runner| runner.id == *name && runner.state == state)
        });
        if ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "runners {names:?} never became {state}: {runners:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
