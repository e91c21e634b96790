//! A sandbox's network. Every sandbox has its own network namespace (bubblewrap
//! `--unshare-net`), so it never sees the host's interfaces, loopback or another sandbox's ports.
//!
//! An outbound sandbox is connected by pasta (Debian's `passt`), a user-mode network stack that
//! carries the namespace's TCP, UDP and ICMP traffic on sockets of the host, with port forwarding
//! off in both directions: nothing outside can connect into a sandbox, and the host's listening
//! ports are not mirrored into it. Because pasta connects from the host, a connection to one of
//! the host's own addresses would reach the host's services: `prohibit` routes in the namespace
//! stop those, link-local addresses (cloud metadata services) and, with an allow list,
//! everything outside it, before a packet leaves. The sandbox user has no CAP_NET_ADMIN and
//! cannot change them.
//!
//! The namespace is made before the sandbox (bound on `<id>.netns` next to the sandbox's record),
//! so that pasta connects it while the volumes are mounted and bubblewrap sets the sandbox up.
//! pasta joins it through that file and quits by itself when the file is removed, so it lives
//! exactly as long as the sandbox's network, across runner restarts.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::io::Write;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::{process, RunnerError};

/// How long pasta may take to configure the namespace.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Never reachable from a sandbox, whatever its allow list: link-local addresses, where cloud
/// metadata services hand out the host's credentials.
const ALWAYS_PROHIBITED: [&str; 1] = ["169.254.0.0/16"];

/// Makes a new network namespace, bound on `netns_file`, and returns it opened (for the
/// sandbox to enter). Only its loopback interface exists, still down until [`connect`].
pub(crate) fn create(netns_file: &Path) -> Result<OwnedFd, RunnerError> {
    disconnect(netns_file);
    std::fs::File::create(netns_file)?;
    let target = CString::new(netns_file.as_os_str().as_bytes())
        .map_err(|_| RunnerError::InvalidInput("state directory path contains NUL".to_owned()))?;
    // Namespaces belong to threads: a thread of its own enters the new one, binds it and ends.
    let bound = std::thread::spawn(move || {
        // SAFETY: unshare and mount(2) with NUL-terminated strings; they affect this thread only.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let source = c"/proc/thread-self/ns/net";
            let none: &CStr = c"none";
            let flags = libc::MS_BIND;
            if libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                none.as_ptr(),
                flags,
                std::ptr::null(),
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(())
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))
    .and_then(|bound| bound);
    if let Err(err) = bound {
        let _ = std::fs::remove_file(netns_file);
        return Err(RunnerError::Unavailable(format!(
            "cannot create the sandbox's network namespace: {err}"
        )));
    }
    Ok(OwnedFd::from(std::fs::File::open(netns_file)?))
}

/// Connects the namespace bound on `netns_file` to the outside through pasta, reaching `allow`
/// only when it is not empty. Blocking: a few short-lived processes.
pub(crate) fn connect(netns_file: &Path, allow: &[IpNet], log: &Path) -> Result<(), RunnerError> {
    start_pasta(netns_file, log)?;
    let mut batch = String::from("link set lo up\n");
    for addr in host_addresses() {
        batch.push_str(&prohibit_route(&IpNet::from(addr)));
    }
    for net in ALWAYS_PROHIBITED {
        batch.push_str(&prohibit_route(&net.parse().expect("a valid network")));
    }
    if !allow.is_empty() {
        batch.push_str(&allow_list_routes(netns_file, allow)?);
    }
    run_ip_batch(netns_file, &batch)
}

/// Drops the `prohibit` default routes of an allow list from a namespace whose pasta died, so
/// that a new pasta can set its default routes up again (before [`connect`]).
pub(crate) fn forget_allow_list(netns_file: &Path) {
    for (_, everything) in FAMILIES {
        // An absent route is fine: only a namespace with an allow list has them.
        let _ = run_ip_batch(netns_file, &format!("route del prohibit {everything}\n"));
    }
}

/// Whether the pasta of the namespace bound on `netns_file` still runs.
pub(crate) fn is_connected(netns_file: &Path) -> bool {
    process::runs_with_argument("pasta", &netns_file.to_string_lossy())
}

/// Makes addresses the host gained after the sandbox started unreachable from it too.
pub(crate) fn prohibit(netns_file: &Path, addrs: &BTreeSet<IpAddr>) -> Result<(), RunnerError> {
    let batch: String = addrs
        .iter()
        .map(|addr| prohibit_route(&IpNet::from(*addr)))
        .collect();
    run_ip_batch(netns_file, &batch)
}

/// Removes the namespace's bind mount (pasta quits when it sees it go). Idempotent.
pub(crate) fn disconnect(netns_file: &Path) {
    let Ok(path) = CString::new(netns_file.as_os_str().as_bytes()) else {
        return;
    };
    // SAFETY: umount2 with a NUL-terminated path; failure (not mounted) is fine.
    unsafe {
        libc::umount2(path.as_ptr(), libc::MNT_DETACH);
    }
    if let Err(err) = std::fs::remove_file(netns_file) {
        if err.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %netns_file.display(), "cannot remove network namespace file: {err}");
        }
    }
}

/// The addresses of the host's interfaces, loopback excluded (it is the sandbox's own inside).
pub(crate) fn host_addresses() -> BTreeSet<IpAddr> {
    let mut addrs = BTreeSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        tracing::warn!(
            "cannot list the host's addresses: {}",
            std::io::Error::last_os_error()
        );
        return addrs;
    }
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: entries of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*entry };
        if let Some(addr) = unsafe { socket_address(ifa.ifa_addr) } {
            if !addr.is_loopback() {
                addrs.insert(addr);
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: `list` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(list) };
    addrs
}

/// Wakes a watcher when the host gains or loses an address: a netlink socket subscribed to the
/// kernel's address notifications, so new host addresses are blocked within milliseconds instead
/// of at the next poll.
pub(crate) struct AddressEvents {
    socket: OwnedFd,
}

impl AddressEvents {
    pub(crate) fn subscribe() -> std::io::Result<AddressEvents> {
        // SAFETY: socket(2) with constant arguments; the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        addr.nl_groups = (libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        // SAFETY: `addr` is a valid sockaddr_nl of the size given.
        let bound = unsafe {
            libc::bind(
                fd,
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(AddressEvents { socket })
    }

    /// Waits up to `timeout` for address notifications and drains them (the caller re-reads the
    /// addresses either way, so which notification came does not matter).
    pub(crate) fn wait(&self, timeout: Duration) {
        use std::os::fd::AsRawFd;
        let fd = self.socket.as_raw_fd();
        let mut pollfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pollfd, 1, millis) } <= 0 {
            return;
        }
        let mut buf = [0u8; 8192];
        // SAFETY: reads into `buf` of its length; the socket is non-blocking, so this ends when
        // the queue is empty (or overflowed: ENOBUFS, which also means "re-read").
        while unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) } > 0 {}
    }
}

/// The IP address in a `sockaddr`, if it is one.
///
/// # Safety
/// `addr` is null or points to a socket address as getifaddrs returns it.
unsafe fn socket_address(addr: *const libc::sockaddr) -> Option<IpAddr> {
    if addr.is_null() {
        return None;
    }
    match i32::from((*addr).sa_family) {
        libc::AF_INET => {
            let v4 = &*(addr as *const libc::sockaddr_in);
            Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
        }
        libc::AF_INET6 => {
            let v6 = &*(addr as *const libc::sockaddr_in6);
            Some(IpAddr::from(v6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}

/// Starts pasta on the namespace and returns once it has configured it (pasta's foreground
/// process exits when its background copy is ready).
fn start_pasta(netns_file: &Path, log: &Path) -> Result<(), RunnerError> {
    let pasta = process::find_program("pasta").ok_or_else(|| {
        RunnerError::Unavailable(
            "pasta is not installed (Debian package passt): sandboxes need it for network access"
                .to_owned(),
        )
    })?;
    let mut command = Command::new(pasta);
    command
        .args(["--config-net", "--quiet", "--no-map-gw"])
        // No port forwarding: from the host into the sandbox (-t, -u) nor from the sandbox to
        // the host's loopback (-T, -U).
        .args(["-t", "none", "-u", "none", "-T", "none", "-U", "none"])
        // It joins the namespace as root; once inside it isolates itself (own empty mount
        // namespace, seccomp filter).
        .args(["--runas", "0"])
        .arg("--log-file")
        .arg(log)
        .arg("--netns")
        .arg(netns_file)
        .env_clear()
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: setsid is async-signal-safe. pasta's background copy must not be in the runner's
    // session (it outlives a runner restart, as the sandbox does).
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RunnerError::Unavailable(
                "pasta did not configure the network in time".to_owned(),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    if !status.success() {
        let mut stderr = String::new();
        if let Some(mut pipe) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
        }
        let reason: Vec<&str> = stderr
            .lines()
            .filter(|line| !line.starts_with("Failed to send") && !line.trim().is_empty())
            .collect();
        return Err(RunnerError::Unavailable(format!(
            "pasta could not connect the sandbox's network ({status}): {}",
            reason.join("; ")
        )));
    }
    Ok(())
}

/// The network of every address of a family, and the `ip` flag that selects it (`ip -batch`
/// lines infer the family from the addresses, so routes name `0.0.0.0/0` or `::/0`, never
/// `default`).
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

fn same_family(a: &IpNet, b: &IpNet) -> bool {
    matches!(
        (a, b),
        (IpNet::V4(_), IpNet::V4(_)) | (IpNet::V6(_), IpNet::V6(_))
    )
}

/// An `ip -batch` line that makes `net` unreachable (connect fails with EACCES at once). A more
/// specific route than any gateway route; the namespace's own addresses stay reachable because
/// the local routing table is consulted first.
fn prohibit_route(net: &IpNet) -> String {
    format!("route replace prohibit {}\n", net.trunc())
}

/// Routes that reach only the allowed networks: the default routes pasta set up become
/// `prohibit`, each allowed network goes through the same gateway.
fn allow_list_routes(netns_file: &Path, allow: &[IpNet]) -> Result<String, RunnerError> {
    let mut batch = String::new();
    for (flag, everything) in FAMILIES {
        let everything: IpNet = everything.parse().expect("a valid network");
        if let Some((gateway, device)) = default_gateway(netns_file, flag)? {
            batch.push_str(&format!(
                "route del {everything} via {gateway} dev {device}\n"
            ));
            for net in allow.iter().filter(|net| same_family(net, &everything)) {
                batch.push_str(&format!(
                    "route replace {} via {gateway} dev {device}\n",
                    net.trunc()
                ));
            }
        }
        batch.push_str(&prohibit_route(&everything));
    }
    Ok(batch)
}

/// The gateway and device of the namespace's default route of one family, if it has one.
fn default_gateway(
    netns_file: &Path,
    family: &str,
) -> Result<Option<(String, String)>, RunnerError> {
    let output = ip_command(netns_file)
        .args([family, "-json", "route", "show", "default"])
        .stdin(Stdio::null())
        .output()?;
    if !output.status.success() {
        return Err(RunnerError::Unavailable(format!(
            "cannot read the sandbox's routes: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    let routes: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout).unwrap_or_default();
    Ok(routes.iter().find_map(|route| {
        let gateway = route.get("gateway")?.as_str()?;
        let device = route.get("dev")?.as_str()?;
        Some((gateway.to_owned(), device.to_owned()))
    }))
}

/// `ip` run inside the sandbox's network namespace (only: it keeps the host's file system, so
/// it is the host's `ip`, never a program of the sandbox).
fn ip_command(netns_file: &Path) -> Command {
    let nsenter = process::find_program("nsenter").unwrap_or_else(|| "nsenter".into());
    let mut command = Command::new(nsenter);
    command
        .arg(format!("--net={}", netns_file.display()))
        .arg("--")
        .arg(process::find_program("ip").unwrap_or_else(|| "ip".into()))
        .env_clear()
        .current_dir("/");
    command
}

fn run_ip_batch(netns_file: &Path, batch: &str) -> Result<(), RunnerError> {
    if batch.is_empty() {
        return Ok(());
    }
    let mut child = ip_command(netns_file)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|err| RunnerError::Unavailable(format!("cannot run ip (iproute2): {err}")))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(batch.as_bytes())?;
    drop(stdin);
    let output = child.wait_with_output()?;
    if !output.status.success() {
        return Err(RunnerError::Unavailable(format!(
            "cannot set the sandbox's routes: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prohibit_routes_name_whole_networks() {
        assert_eq!(
            prohibit_route(&"10.1.2.3/8".parse().unwrap()),
            "route replace prohibit 10.0.0.0/8\n"
        );
        assert_eq!(
            prohibit_route(&IpNet::from("fd00::2".parse::<IpAddr>().unwrap())),
            "route replace prohibit fd00::2/128\n"
        );
    }

    #[test]
    fn host_addresses_exclude_loopback() {
        assert!(host_addresses().iter().all(|addr| !addr.is_loopback()));
    }
}
