//! `GET /metrics` over TCP or a unix socket, for processes without an HTTP server of their own
//! (the mount daemon). A plain HTTP/1.1 responder on one thread: a scrape is one short request
//! every few seconds, and a client that stalls is cut off by the socket timeouts.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long one client may take to send its request or read the answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest request head accepted (a scrape's is a few hundred bytes).
const MAX_HEAD: u64 = 16 << 10;

/// Where to serve the metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(addr) => write!(f, "http://{addr}/metrics"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound metrics endpoint. Bind it early (to report a taken port at once), start serving with
/// [`MetricsServer::spawn`] (a thread: after any fork); dropping it removes a unix socket's file.
pub struct MetricsServer {
    socket: Socket,
    endpoint: Endpoint,
}

impl MetricsServer {
    /// Binds `endpoint` (TCP port 0: any free port, see [`MetricsServer::endpoint`]). A unix
    /// socket's file left by a dead process is replaced; one that a live process serves is not.
    pub fn bind(endpoint: &Endpoint) -> std::io::Result<MetricsServer> {
        let (socket, endpoint) = match endpoint {
            Endpoint::Tcp(addr) => {
                let listener = TcpListener::bind(addr)?;
                let bound = listener.local_addr()?;
                (Socket::Tcp(listener), Endpoint::Tcp(bound))
            }
            Endpoint::Unix(path) => {
                remove_stale_socket(path)?;
                let listener = UnixListener::bind(path)?;
                (Socket::Unix(listener), Endpoint::Unix(path.clone()))
            }
        };
        Ok(MetricsServer { socket, endpoint })
    }

    /// The bound endpoint (with the port TCP chose).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Serves on a thread of its own for the rest of the process's life.
    pub fn spawn(&self) -> std::io::Result<()> {
        let socket = match &self.socket {
            Socket::Tcp(listener) => Socket::Tcp(listener.try_clone()?),
            Socket::Unix(listener) => Socket::Unix(listener.try_clone()?),
        };
        std::thread::Builder::new()
            .name("cellar-metrics".into())
            .spawn(move || accept_loop(&socket))?;
        Ok(())
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Endpoint::Unix(path) = &self.endpoint {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn remove_stale_socket(path: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by another process", path.display()),
        )),
        Err(_) => std::fs::remove_file(path),
    }
}

fn accept_loop(socket: &Socket) {
    loop {
        let served = match socket {
            Socket::Tcp(listener) => listener.accept().and_then(|(stream, _)| answer(stream)),
            Socket::Unix(listener) => listener.accept().and_then(|(stream, _)| answer(stream)),
        };
        if let Err(err) = served {
            tracing::debug!(error = %err, "metrics request failed");
        }
    }
}

/// A connected client.
trait Client: Read + Write {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()>;
}

impl Client for std::net::TcpStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl Client for UnixStream {
    fn set_timeouts(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

/// Reads one request and answers it; the connection is closed after every answer.
fn answer(stream: impl Client) -> std::io::Result<()> {
    stream.set_timeouts(CLIENT_TIMEOUT)?;
    let mut reader = BufReader::new(stream.take(MAX_HEAD));
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The rest of the head (headers) up to the blank line; a scrape has no body.
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", crate::CONTENT_TYPE, crate::encode()),
        (_, "/metrics") => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
        _ => ("404 Not Found", "text/plain", "see /metrics\n".to_string()),
    };
    let mut stream = reader.into_inner().into_inner();
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    if method != "HEAD" {
        stream.write_all(body.as_bytes())?;
    }
    stream.flush()
}
