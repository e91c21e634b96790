//! Escape attempts against a real bubblewrap sandbox, each one refused (the table is in
//! docs/CONFIGURATION.md, "Refused escapes"). The server keeps its control state and the volume's
//! metadata in PostgreSQL and the blocks on S3, so the volume's mount daemon holds a database
//! password and S3 keys: none of them, nor the API key, may be seen from inside the sandbox.
//! Needs root, bwrap, pasta, /dev/fuse, the cellar binary (CELLAR_BIN or target/debug/cellar),
//! the test PostgreSQL (CELLAR_TEST_POSTGRES_URL) and the test RGW (CELLAR_TEST_S3_URL, AWS_*),
//! as tests/run.sh provides them.

mod common;

use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{exec, require_runner_prerequisites, Control, TestServer};
use reqwest::StatusCode;
use serde_json::{json, Value};

/// The host's own IPv4 addresses (loopback included), from `ip -4 -o addr`.
fn host_addresses() -> Vec<IpAddr> {
    let output = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            line.split_whitespace()
                .nth(3)?
                .split('/')
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

/// Host processes whose command line holds `needle`.
fn host_processes_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains(needle))
        })
        .collect()
}

fn with_query(url: &str, query: &[(&str, &str)]) -> reqwest::Url {
    reqwest::Url::parse_with_params(url, query).unwrap()
}

/// Runs `command` in the sandbox, which must exit 0; returns its output.
async fn ok(server: &TestServer, sandbox: &Value, command: &str) -> String {
    let (code, out) = exec(server, sandbox, command).await;
    assert_eq!(code, 0, "{command}: {out}");
    out
}

struct Escapes {
    server: TestServer,
    sandbox: Value,
    volume_id: String,
    /// The sandbox's home on the host.
    home: PathBuf,
}

impl Escapes {
    async fn start() -> Escapes {
        require_runner_prerequisites();
        let store_url = common::s3_store_url();
        let server = TestServer::start_on_with(Control::Postgres, |config| {
            config.store_url = store_url;
            // All addresses: the sandbox must reach the API on none of them.
            config.listen = "0.0.0.0:0".parse().unwrap();
        })
        .await;
        let volume = server.create_volume("escapes").await;
        let volume_id = volume["id"].as_str().unwrap().to_string();
        let (status, sandbox) = server
            .post(
                "/api/sandbox",
                &json!({"volumes": [{"volumeId": volume_id, "mountPath": "/home/daytona/volume"}]}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{sandbox}");
        let home = server
            .dir
            .path()
            .join("runner/sandboxes")
            .join(sandbox["id"].as_str().unwrap())
            .join("home");
        assert!(home.is_dir(), "{}", home.display());
        Escapes {
            server,
            sandbox,
            volume_id,
            home,
        }
    }

    fn toolbox(&self, endpoint: &str) -> String {
        format!(
            "{}/{}/{endpoint}",
            self.sandbox["toolboxProxyUrl"].as_str().unwrap(),
            self.sandbox["id"].as_str().unwrap()
        )
    }

    /// A bulk download: the Content-Disposition of each part and the whole body.
    async fn download(&self, paths: &[&str]) -> String {
        let response = self
            .server
            .http
            .post(self.toolbox("files/bulk-download"))
            .bearer_auth(&self.server.key)
            .json(&json!({ "paths": paths }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        String::from_utf8_lossy(&response.bytes().await.unwrap()).into_owned()
    }

    async fn upload(&self, path: &str, content: &'static str) -> (StatusCode, Value) {
        let form = reqwest::multipart::Form::new()
            .text("files[0].path", path.to_string())
            .part(
                "files[0].file",
                reqwest::multipart::Part::bytes(content.as_bytes()).file_name("f"),
            );
        self.server
            .send(
                self.server
                    .http
                    .post(self.toolbox("files/bulk-upload"))
                    .bearer_auth(&self.server.key)
                    .multipart(form),
            )
            .await
    }

    async fn stop(self) {
        let id = self.sandbox["id"].as_str().unwrap();
        let (status, body) = self.server.delete(&format!("/api/sandbox/{id}")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        self.server
            .wait_for(&format!("/api/sandbox/{id}"), "state", "destroyed")
            .await;
        self.server.stop().await;
    }
}

#[tokio::test]
async fn escapes_from_a_sandbox_are_refused() {
    let fx = Escapes::start().await;
    let (server, sandbox) = (&fx.server, &fx.sandbox);

    // Mount paths at system directories, with `..`, `//`, relative or at the root: 400, and no
    // sandbox is left behind.
    for mount_path in [
        "/proc",
        "/proc/self",
        "/etc",
        "//etc",
        "/etc/",
        "/home/daytona/../../etc",
        "/home/daytona/./v",
        "home/daytona/v",
        "v",
        "/",
        "/usr/bin",
        "/sys/fs",
        "/dev/shm",
        "/lib",
    ] {
        let (status, body) = server
            .post(
                "/api/sandbox",
                &json!({"volumes": [{"volumeId": fx.volume_id, "mountPath": mount_path}]}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{mount_path}: {body}");
    }

    // Subpaths through symlinks planted in the volume (absolute, upwards, nested) or with `..`.
    ok(
        server,
        sandbox,
        "cd volume && echo volume-secret > secret && ln -s / to-root && ln -s ../../.. up \
         && mkdir -p ok/deeper && ln -s /etc ok/etc && ln -s ../.. ok/deeper/up2",
    )
    .await;
    for subpath in [
        "to-root",
        "to-root/etc",
        "up",
        "ok/etc",
        "ok/deeper/up2",
        "ok/../..",
        "../x",
        "/etc",
        "secret",
    ] {
        let (status, body) = server
            .post(
                "/api/sandbox",
                &json!({"volumes": [{"volumeId": fx.volume_id, "mountPath": "/data", "subpath": subpath}]}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{subpath}: {body}");
    }
    let (_, list) = server.get("/api/sandbox").await;
    let live: Vec<&Value> = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] != "destroyed" && s["state"] != "error")
        .collect();
    assert_eq!(live.len(), 1, "only the first sandbox runs: {list}");

    // The host's processes are invisible: the sandbox's /proc holds its own PID namespace.
    let daemons = host_processes_with(&fx.volume_id);
    assert!(!daemons.is_empty(), "the mount daemon runs on the host");
    let out = ok(
        server,
        sandbox,
        "for p in /proc/[0-9]*; do tr '\\0' ' ' < $p/cmdline; echo; done",
    )
    .await;
    assert!(!out.contains("cellar"), "host processes visible: {out}");
    assert!(!out.contains(&fx.volume_id), "{out}");
    let pids = ok(server, sandbox, "ls -d /proc/[0-9]* | wc -l").await;
    assert!(pids.trim().parse::<u32>().unwrap() < 10, "{pids}");
    // The init (root without capabilities) is off limits.
    ok(
        server,
        sandbox,
        "! cat /proc/1/environ 2>/dev/null && ! ls /proc/1/root/ 2>/dev/null",
    )
    .await;

    // Credentials: the S3 keys, the database password and the API key are in the mount
    // daemon's environment on the host, and nowhere the sandbox can read: its environment,
    // every /proc/*/environ and cmdline, mountinfo, and the files of /etc, /tmp, /home, /run.
    let postgres = url::Url::parse(&cellar_meta::testing::postgres_url()).unwrap();
    let secrets = [
        std::env::var("AWS_ACCESS_KEY_ID").unwrap(),
        std::env::var("AWS_SECRET_ACCESS_KEY").unwrap(),
        postgres.password().unwrap().to_string(),
        server.key.clone(),
    ];
    let daemon_env = std::fs::read(format!("/proc/{}/environ", daemons[0])).unwrap();
    let daemon_env = String::from_utf8_lossy(&daemon_env);
    for secret in &secrets[..3] {
        assert!(daemon_env.contains(secret.as_str()), "positive control");
    }
    let seen = ok(
        server,
        sandbox,
        "env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline /proc/self/mountinfo 2>/dev/null; \
         find /etc /tmp /home /run -xdev -type f -readable -size -1024k -exec cat {} + 2>/dev/null; \
         ls -la / /var /var/lib /root 2>&1; true",
    )
    .await;
    assert!(seen.len() > 10_000, "the sandbox read its files: {seen}");
    for (i, secret) in secrets.iter().enumerate() {
        assert!(
            !seen.contains(secret.as_str()),
            "secret {i} visible in the sandbox"
        );
    }
    let data_dir = server.dir.path().display().to_string();
    assert!(!seen.contains(&format!("{data_dir}/control")), "{seen}");
    assert_eq!(
        exec(server, sandbox, &format!("ls {data_dir}")).await.0,
        2,
        "the server's data directory is not in the sandbox"
    );

    // The API, on the host's loopback and on every address of the host, from a sandbox with
    // outbound network: unreachable. From the host it answers.
    let port = server.base.rsplit(':').next().unwrap().to_string();
    for addr in host_addresses() {
        let host = addr.to_string();
        assert!(
            std::net::TcpStream::connect((addr, port.parse::<u16>().unwrap())).is_ok(),
            "positive control: the API listens on {host}"
        );
        let (code, out) = exec(
            server,
            sandbox,
            &format!("timeout 5 curl -s -o /dev/null -w '%{{http_code}}' http://{host}:{port}/api/openapi.json"),
        )
        .await;
        // 7: curl could not connect (the sandbox's routes refuse the host), 28: timed out.
        assert!(
            [7, 28].contains(&code),
            "the API at {host}:{port} from the sandbox: exit {code}, {out}"
        );
    }

    // Nor through the sandbox's gateway, which pasta would map to the host's loopback.
    let gateway = ok(server, sandbox, "ip -4 route show default").await;
    let gateway = gateway
        .split_whitespace()
        .nth(2)
        .unwrap_or_else(|| panic!("{gateway}"));
    let (code, out) = exec(
        server,
        sandbox,
        &format!("timeout 5 curl -s -o /dev/null http://{gateway}:{port}/api/openapi.json"),
    )
    .await;
    assert!(
        [7, 28, 124].contains(&code),
        "the API through the gateway {gateway}: exit {code}, {out}"
    );

    // Setuid binaries gain nothing: no_new_privs, no capabilities, every mount nosuid; a
    // setuid-root binary planted in the home from the host runs as the sandbox user.
    let status = ok(
        server,
        sandbox,
        "grep -E '^(NoNewPrivs|CapEff|CapBnd)' /proc/self/status",
    )
    .await;
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    assert!(status.contains("CapEff:\t0000000000000000"), "{status}");
    assert!(status.contains("CapBnd:\t0000000000000000"), "{status}");
    let planted = fx.home.join("rootid");
    std::fs::copy("/usr/bin/id", &planted).unwrap();
    std::os::unix::fs::chown(&planted, Some(0), Some(0)).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o4755)).unwrap();
    assert_eq!(std::fs::metadata(&planted).unwrap().mode() & 0o7777, 0o4755);
    assert_eq!(ok(server, sandbox, "./rootid -u").await.trim(), "1000");
    let (code, out) = exec(
        server,
        sandbox,
        "sudo -n id -u; su -c 'id -u' root </dev/null",
    )
    .await;
    assert_ne!(code, 0, "{out}");
    assert!(!out.lines().any(|line| line.trim() == "0"), "{out}");
    let (code, out) = exec(
        server,
        sandbox,
        "mkdir -p /tmp/m && mount -t tmpfs none /tmp/m",
    )
    .await;
    assert_ne!(code, 0, "setuid mount: {out}");
    let mounts = ok(server, sandbox, "cat /proc/self/mountinfo").await;
    for line in mounts.lines() {
        let mount_point = line.split(' ').nth(4).unwrap_or_default();
        if ["/home/daytona", "/home/daytona/volume", "/usr", "/tmp"].contains(&mount_point) {
            assert!(line.contains("nosuid"), "{line}");
        }
        if mount_point == "/home/daytona/volume" {
            assert!(line.contains("nodev"), "{line}");
        }
    }

    // A device node a host's root put into the volume cannot be opened (nodev), and there is
    // no /sys and no host device in /dev.
    let host_mount = server.dir.path().join("runner/mounts").join(&fx.volume_id);
    let node = std::ffi::CString::new(host_mount.join("zero").to_str().unwrap()).unwrap();
    // SAFETY: mknod on a NUL-terminated path.
    let made = unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 5)) };
    assert_eq!(made, 0, "{}", std::io::Error::last_os_error());
    let (code, out) = exec(server, sandbox, "head -c 4 volume/zero | od -An -tx1").await;
    assert!(
        code != 0 || !out.contains("00 00 00 00"),
        "a device node in the volume opened: {out}"
    );
    let out = ok(server, sandbox, "ls -A /sys 2>&1; ls /dev").await;
    for device in ["fuse", "sda", "vda", "mem", "kmsg", "loop0"] {
        assert!(!out.lines().any(|l| l == device), "/dev/{device}: {out}");
    }

    // `..` in toolbox paths resolves inside the sandbox: the host's /etc/shadow and the init's
    // environment stay unreadable, an upload "to the host's /tmp" lands in the sandbox's /tmp,
    // one to /etc is refused.
    let body = fx
        .download(&[
            "../../../../etc/shadow",
            "/home/daytona/../../proc/1/environ",
            "volume/to-root/etc/shadow",
        ])
        .await;
    assert!(!body.contains("name=\"file\""), "{body}");
    assert_eq!(body.matches("name=\"error\"").count(), 3, "{body}");
    let name = format!("escape-{}", uuid::Uuid::new_v4());
    let (status, body) = fx
        .upload(&format!("../../../../tmp/{name}"), "inside")
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        !Path::new("/tmp").join(&name).exists(),
        "written on the host's /tmp"
    );
    assert_eq!(
        ok(server, sandbox, &format!("cat /tmp/{name}")).await,
        "inside"
    );
    let (status, body) = fx.upload(&format!("../../../etc/{name}"), "x").await;
    assert!(status.is_client_error(), "{status}: {body}");
    assert!(
        body["message"].as_str().unwrap().contains("Read-only"),
        "{body}"
    );
    assert!(!Path::new("/etc").join(&name).exists());

    // Symlinks in the volume, followed by the server's file API: resolved inside the volume,
    // never on the host (nor the sandbox's view of it).
    ok(
        server,
        sandbox,
        "cd volume && ln -s /etc/passwd pw && ln -s ../../../../../../etc rel-etc && ln -s /etc abs-etc",
    )
    .await;
    let files = format!("/api/volumes/{}/files", fx.volume_id);
    // A link the call names is not followed (409); links on the way resolve in the volume's root.
    for (path, expected) in [
        ("/pw", StatusCode::CONFLICT),
        ("/rel-etc/passwd", StatusCode::NOT_FOUND),
        ("/abs-etc/passwd", StatusCode::NOT_FOUND),
        ("/to-root/etc/passwd", StatusCode::NOT_FOUND),
        ("/to-root/secret", StatusCode::OK),
    ] {
        let response = server
            .http
            .get(with_query(
                &server.url(&format!("{files}/content")),
                &[("path", path)],
            ))
            .bearer_auth(&server.key)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        assert!(!text.contains("root:x:0:0"), "{path}: the host's passwd");
        assert_eq!(status, expected, "{path}: {text}");
    }
    let (status, body) = server
        .send(
            server
                .http
                .get(with_query(&server.url(&files), &[("path", "/abs-etc")]))
                .bearer_auth(&server.key),
        )
        .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "listing a link to /etc: {body}"
    );
    // An upload through a link to / lands in the volume's own /etc or is refused; never the host's.
    let response = server
        .http
        .put(with_query(
            &server.url(&format!("{files}/content")),
            &[
                ("path", &format!("/to-root/etc/{name}")),
                ("parents", "true"),
            ],
        ))
        .bearer_auth(&server.key)
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(response.status().is_client_error() || response.status().is_success());
    assert!(
        !Path::new("/etc").join(&name).exists(),
        "written to the host's /etc"
    );
    // The toolbox follows the same links as the sandbox's processes, inside the sandbox.
    let body = fx.download(&["volume/abs-etc/shadow", "volume/pw"]).await;
    assert!(body.contains("filename=\"volume/pw\""), "{body}");
    assert!(
        body.contains("daytona:x:1000"),
        "the sandbox's own passwd: {body}"
    );

    fx.stop().await;
}
