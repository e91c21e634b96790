//! The toolbox operations: every one runs a process inside the sandbox's namespaces and root,
//! as the sandbox user, with a clean environment (`nsenter` + `setpriv` + `env -i`). Files are
//! therefore written and read with the sandbox user's rights and paths resolve in the sandbox's
//! root, so a symlink in the sandbox can never reach a host file.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::sandbox::{
    become_sandbox_user_args, SandboxRecord, SANDBOX_HOME, SANDBOX_PATH, SANDBOX_USER,
};
use crate::{process, ExecRequest, ExecResult, RunnerError};

/// Exec output beyond this many bytes is dropped (the process still runs to completion).
pub const EXEC_OUTPUT_LIMIT: usize = 10 << 20;
/// Exit code reported when an exec hits its timeout (as coreutils `timeout` does).
pub const EXEC_TIMEOUT_EXIT_CODE: i32 = 124;
/// After the command exits, output still buffered is collected for this long; background
/// processes that keep the pipe open do not hold the call.
const OUTPUT_DRAIN: Duration = Duration::from_millis(200);
const STDERR_LIMIT: usize = 64 << 10;

/// Where and how a toolbox process runs.
pub(crate) struct Target<'a> {
    pub record: &'a SandboxRecord,
    pub cgroup_procs: Vec<CString>,
}

impl Target<'_> {
    /// A command running `script` with `/bin/sh -c` (positional arguments `args`) inside the
    /// sandbox, in its own process group.
    fn command(
        &self,
        cwd: &str,
        extra_env: &BTreeMap<String, String>,
        script: &str,
        args: &[&str],
    ) -> Result<tokio::process::Command, RunnerError> {
        let nsenter = process::find_program("nsenter")
            .ok_or_else(|| RunnerError::Unavailable("nsenter is not installed".to_owned()))?;
        let mut command = tokio::process::Command::new(nsenter);
        command
            .arg(format!("--target={}", self.record.init_pid))
            .args(["--mount", "--pid", "--ipc", "--uts", "--net"])
            // Root and working directory of the sandbox's init: never the runner's own cwd.
            .args(["--root", "--wd"])
            .args(become_sandbox_user_args())
            .args(["env", "-i"])
            .arg(format!("--chdir={cwd}"))
            .arg(format!("HOME={SANDBOX_HOME}"))
            .arg(format!("PATH={SANDBOX_PATH}"))
            .arg(format!("USER={SANDBOX_USER}"));
        for (key, value) in self.record.env.iter().chain(extra_env) {
            command.arg(format!("{key}={value}"));
        }
        command
            .args(["/bin/sh", "-c", script, "sh"])
            .args(args)
            .env_clear()
            .current_dir("/")
            .process_group(0)
            .kill_on_drop(true);
        let cgroup_procs = self.cgroup_procs.clone();
        let seccomp = crate::seccomp::filters()?;
        // SAFETY: only async-signal-safe calls between fork and exec (see cgroup::join_self,
        // seccomp::Filters::apply).
        unsafe {
            command.pre_exec(move || {
                crate::cgroup::join_self(&cgroup_procs);
                seccomp.apply()
            });
        }
        Ok(command)
    }

    pub(crate) async fn exec(&self, req: ExecRequest) -> Result<ExecResult, RunnerError> {
        validate_env(&req.env)?;
        if req.args.iter().any(|arg| arg.contains('\0')) {
            return Err(RunnerError::InvalidInput(
                "exec arguments must not contain NUL".to_owned(),
            ));
        }
        // A relative cwd is relative to the home, like every other sandbox path.
        let cwd = match req.cwd.as_deref() {
            None | Some("") => SANDBOX_HOME.to_owned(),
            Some(cwd) if cwd.starts_with('/') => cwd.to_owned(),
            Some(cwd) => format!("{SANDBOX_HOME}/{cwd}"),
        };
        let args: Vec<&str> = req.args.iter().map(String::as_str).collect();
        let mut command = self.command(&cwd, &req.env, &req.command, &args)?;
        // One pipe for stdout and stderr: output interleaves as a terminal would show it.
        let (reader, writer) = std::io::pipe()?;
        command
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        let mut child = command.spawn()?;
        // The command holds the pipe's write ends; they must close for EOF to come.
        drop(command);
        let mut group = ProcessGroupGuard::new(&child);
        let mut reader = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;

        let mut output = Vec::new();
        let run = collect_output(&mut child, &mut reader, &mut output);
        let result = match req.timeout {
            Some(limit) => tokio::time::timeout(limit, run).await.ok(),
            None => Some(run.await),
        };
        let exit_code = match result {
            Some(status) => {
                group.disarm();
                exit_code(status?)
            }
            None => {
                group.kill();
                let _ = child.wait().await;
                EXEC_TIMEOUT_EXIT_CODE
            }
        };
        Ok(ExecResult {
            exit_code,
            output: String::from_utf8_lossy(&output).into_owned(),
        })
    }

    /// Writes `body` to `path` (parents created) as the sandbox user, streaming.
    pub(crate) async fn upload(
        &self,
        path: &str,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<(), RunnerError> {
        validate_path(path)?;
        let script = r#"mkdir -p -- "$(dirname -- "$1")" && exec cat > "$1""#;
        let mut command = self.command(SANDBOX_HOME, &BTreeMap::new(), script, &[path])?;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn()?;
        let mut group = ProcessGroupGuard::new(&child);
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let mut stderr = child.stderr.take().expect("stderr is piped");
        let mut body = tokio::io::BufReader::with_capacity(256 << 10, body);
        let copied = tokio::io::copy_buf(&mut body, &mut stdin).await;
        drop(stdin);
        let mut message = Vec::new();
        match copied {
            // A broken pipe means the writer failed: its own message says why.
            Err(err) if err.kind() != std::io::ErrorKind::BrokenPipe => {
                return Err(RunnerError::Io(err));
            }
            _ => {}
        }
        (&mut stderr)
            .take(STDERR_LIMIT as u64)
            .read_to_end(&mut message)
            .await?;
        let status = child.wait().await?;
        group.disarm();
        if !status.success() {
            return Err(RunnerError::InvalidInput(format!(
                "cannot write {path}: {}",
                String::from_utf8_lossy(&message).trim()
            )));
        }
        Ok(())
    }

    /// Streams the file at `path`; NotFound (before any byte) if it does not exist.
    pub(crate) async fn download(&self, path: &str) -> Result<FileStream, RunnerError> {
        validate_path(path)?;
        // The first byte tells whether the file can be read; the file follows it.
        let script = r#"if [ -d "$1" ]; then printf D
elif [ ! -e "$1" ]; then printf N
elif [ ! -r "$1" ]; then printf P
else printf K; exec cat -- "$1"; fi"#;
        let mut command = self.command(SANDBOX_HOME, &BTreeMap::new(), script, &[path])?;
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn()?;
        let group = ProcessGroupGuard::new(&child);
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let mut verdict = [0u8; 1];
        let read = stdout.read(&mut verdict).await?;
        match (read, verdict[0]) {
            (1, b'K') => {}
            (1, b'N') => return Err(RunnerError::NotFound(format!("file {path}"))),
            (1, b'D') => return Err(RunnerError::InvalidInput(format!("{path} is a directory"))),
            (1, b'P') => {
                return Err(RunnerError::InvalidInput(format!(
                    "{path}: permission denied"
                )))
            }
            _ => {
                return Err(RunnerError::Unavailable(format!(
                    "cannot read {path}: sandbox process failed"
                )))
            }
        }
        Ok(FileStream {
            stdout,
            exit: Some(Box::pin(async move { child.wait().await })),
            group,
        })
    }
}

/// Reads the command's output until it exits (plus a short drain) and returns its status.
async fn collect_output(
    child: &mut tokio::process::Child,
    reader: &mut tokio::net::unix::pipe::Receiver,
    output: &mut Vec<u8>,
) -> Result<ExitStatus, RunnerError> {
    let mut buf = vec![0u8; 64 << 10];
    let mut status = None;
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86400 * 365);
    let mut drain_until = far_future;
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    break;
                }
                let room = EXEC_OUTPUT_LIMIT.saturating_sub(output.len());
                output.extend_from_slice(&buf[..n.min(room)]);
            }
            exited = child.wait(), if status.is_none() => {
                status = Some(exited?);
                drain_until = tokio::time::Instant::now() + OUTPUT_DRAIN;
            }
            _ = tokio::time::sleep_until(drain_until), if status.is_some() => break,
        }
    }
    match status {
        Some(status) => Ok(status),
        None => Ok(child.wait().await?),
    }
}

/// The shell convention: the exit code, or 128 + the signal that killed the process.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status
        .code()
        .or_else(|| status.signal().map(|signal| 128 + signal))
        .unwrap_or(-1)
}

pub(crate) fn validate_env(env: &BTreeMap<String, String>) -> Result<(), RunnerError> {
    for (key, value) in env {
        let valid_key = !key.is_empty()
            && !key.starts_with(|c: char| c.is_ascii_digit())
            && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_key {
            return Err(RunnerError::InvalidInput(format!(
                "invalid environment variable name {key:?}"
            )));
        }
        if value.contains('\0') {
            return Err(RunnerError::InvalidInput(format!(
                "environment variable {key} contains NUL"
            )));
        }
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), RunnerError> {
    if path.is_empty() || path.contains('\0') {
        return Err(RunnerError::InvalidInput(format!("invalid path {path:?}")));
    }
    Ok(())
}

/// Kills a toolbox process and everything it started (its process group) when the operation is
/// abandoned: a timeout, or the caller dropping the future or stream.
struct ProcessGroupGuard {
    pgid: Option<i32>,
}

impl ProcessGroupGuard {
    fn new(child: &tokio::process::Child) -> ProcessGroupGuard {
        ProcessGroupGuard {
            pgid: child.id().map(|pid| pid as i32),
        }
    }

    fn disarm(&mut self) {
        self.pgid = None;
    }

    fn kill(&mut self) {
        if let Some(pgid) = self.pgid.take() {
            process::kill(-pgid, libc::SIGKILL);
        }
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

type ExitFuture = Pin<Box<dyn Future<Output = std::io::Result<ExitStatus>> + Send>>;

/// A file streamed out of a sandbox. Ends with an error, rather than silently short, if reading
/// the file failed midway.
pub struct FileStream {
    stdout: tokio::process::ChildStdout,
    exit: Option<ExitFuture>,
    group: ProcessGroupGuard,
}

impl AsyncRead for FileStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.stdout).poll_read(cx, buf))?;
        if buf.filled().len() > before || buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if let Some(exit) = this.exit.as_mut() {
            let status = ready!(exit.as_mut().poll(cx))?;
            this.exit = None;
            this.group.disarm();
            if !status.success() {
                return Poll::Ready(Err(std::io::Error::other(format!(
                    "reading the file in the sandbox failed ({status})"
                ))));
            }
        }
        Poll::Ready(Ok(()))
    }
}
