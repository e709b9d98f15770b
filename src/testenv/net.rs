//! Simulated hosts: network namespaces on a bridge, with probes.
//!
//! ```text
//!   fabric netns (palisade-<pid>-<n>-fabric)
//!   ┌──────────────── br0 ────────────────┐
//!   h10             h11                  h12        (veth ends)
//!    │               │                    │
//!   eth0            eth0                 eth0       (one netns per host)
//!   198.18.n.10/24  198.18.n.11/24  …    2001:db8:ff:n::a/64, ::b/64, …
//! ```
//!
//! Addresses come only from documentation/benchmark ranges (198.18.0.0/15,
//! 2001:db8::/32, and whatever a test adds, e.g. 203.0.113.0/24), and live
//! only inside namespaces created here; the root namespace gets nothing.

use super::netns::{self, in_netns, ip};
use super::{Error, Result, reaper};
use ipnet::IpNet;
use socket2::{Domain, SockAddr, Socket, Type};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First host number on a net (lower ones are left free, as AWS reserves them).
const FIRST_HOST: u8 = 10;
/// How often idle listener threads look at their stop flag.
const POLL: Duration = Duration::from_millis(10);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

struct NetInner {
    index: u8,
    fabric: String,
    next_host: AtomicU8,
    /// Namespaces of the live hosts.
    hosts: Mutex<BTreeSet<String>>,
    /// Prefixes of extra addresses: every host gets an on-link route.
    routes: Mutex<Vec<IpNet>>,
}

impl Drop for NetInner {
    fn drop(&mut self) {
        netns::delete(&self.fabric);
    }
}

/// A simulated L2 network: a bridge in a private "fabric" namespace that
/// [`SimHost`]s plug into. Net `n` (process-wide counter, 1–254) gives its
/// hosts 198.18.n.0/24 and 2001:db8:ff:n::/64. Dropping it (and all its
/// hosts) deletes every namespace; the watchdog does so if the process dies.
pub struct SimNet {
    inner: Arc<NetInner>,
}

impl std::fmt::Debug for SimNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNet")
            .field("fabric", &self.inner.fabric)
            .finish_non_exhaustive()
    }
}

impl SimNet {
    /// Creates the fabric namespace and its bridge. Sweeps namespaces left by
    /// dead test processes first.
    pub fn new() -> Result<SimNet> {
        static NEXT: AtomicU8 = AtomicU8::new(1);
        reaper::sweep_stale();
        reaper::ensure_started();
        let index = NEXT
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(1).filter(|n| *n < 255)
            })
            .map_err(|_| Error::Invalid("more than 254 SimNets in one process".into()))?;
        let fabric = format!("{}{index}-fabric", reaper::netns_prefix());
        ip(&["netns", "add", &fabric])?;
        // From here on, Drop deletes the namespace whatever fails next.
        let inner = Arc::new(NetInner {
            index,
            fabric,
            next_host: AtomicU8::new(FIRST_HOST),
            hosts: Mutex::new(BTreeSet::new()),
            routes: Mutex::new(Vec::new()),
        });
        let f = inner.fabric.as_str();
        ip(&["-n", f, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            f,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        ip(&["-n", f, "link", "set", "br0", "up"])?;
        Ok(SimNet { inner })
    }

    /// The fabric namespace's name.
    pub fn fabric_netns(&self) -> &str {
        &self.inner.fabric
    }

    /// Adds a host: a namespace `palisade-<pid>-<n>-<name>` with `lo` up and
    /// `eth0` on the bridge carrying the next IPv4 and IPv6 address of the
    /// net (DAD off, so both are usable at once). `name`: lowercase letters,
    /// digits and `-`, at most 40 characters.
    pub fn add_host(&self, name: &str) -> Result<SimHost> {
        let valid = !name.is_empty()
            && name.len() <= 40
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(Error::Invalid(format!(
                "host name {name:?}: use [a-z0-9-], at most 40"
            )));
        }
        let number = self
            .inner
            .next_host
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                n.checked_add(1).filter(|n| *n < 255)
            })
            .map_err(|_| Error::Invalid("more than 244 hosts on one SimNet".into()))?;
        let ns = format!("{}{}-{name}", reaper::netns_prefix(), self.inner.index);
        let ipv4 = Ipv4Addr::new(198, 18, self.inner.index, number);
        let ipv6 = Ipv6Addr::new(
            0x2001,
            0xdb8,
            0xff,
            u16::from(self.inner.index),
            0,
            0,
            0,
            u16::from(number),
        );

        if std::path::Path::new(&netns::handle(&ns)).exists() {
            return Err(Error::Invalid(format!(
                "host {name} already exists on this net"
            )));
        }
        ip(&["netns", "add", &ns])?;
        lock(&self.inner.hosts).insert(ns.clone());
        // From here on, Drop of the host cleans up whatever fails next.
        let host = SimHost {
            net: Arc::clone(&self.inner),
            name: name.to_string(),
            ns,
            ipv4,
            ipv6,
            extra: Mutex::new(Vec::new()),
            forwards: Mutex::new(Vec::new()),
        };
        let ns = host.ns.as_str();
        let fabric = self.inner.fabric.as_str();
        let port = format!("h{number}");
        let v4 = format!("{ipv4}/24");
        let v6 = format!("{ipv6}/64");
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        netns::sysctl(ns, "net.ipv6.conf.all.accept_dad", "0")?;
        netns::sysctl(ns, "net.ipv6.conf.default.accept_dad", "0")?;
        ip(&[
            "-n", fabric, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", fabric, "link", "set", &port, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", &v4, "dev", "eth0"])?;
        ip(&["-n", ns, "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        let routes = lock(&self.inner.routes).clone();
        for route in routes {
            host.add_onlink_route(route)?;
        }
        Ok(host)
    }
}

/// What a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach {
    /// The listener answered with the probe's payload.
    Open,
    /// The peer (or a `REJECT` rule) answered "port unreachable" / RST.
    Refused,
    /// "Host/network unreachable", or dropped on the way out (`EPERM`).
    Unreachable,
    /// No answer in time (typically a `DROP` rule).
    TimedOut,
}

impl Reach {
    /// Whether the port answered.
    pub fn is_open(self) -> bool {
        self == Reach::Open
    }
}

fn classify(err: &std::io::Error) -> Option<Reach> {
    use std::io::ErrorKind;
    match err.kind() {
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset => Some(Reach::Refused),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => Some(Reach::TimedOut),
        ErrorKind::HostUnreachable
        | ErrorKind::NetworkUnreachable
        | ErrorKind::PermissionDenied => Some(Reach::Unreachable),
        _ => match err.raw_os_error() {
            // EPERM (an OUTPUT DROP), ENETUNREACH, EHOSTUNREACH.
            Some(1 | 101 | 113) => Some(Reach::Unreachable),
            _ => None,
        },
    }
}

fn nonce() -> Vec<u8> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("palisade-probe {} {n} {t}\n", std::process::id()).into_bytes()
}

fn bind_source(socket: &Socket, src: Option<IpAddr>) -> std::io::Result<()> {
    match src {
        Some(ip) => socket.bind(&SockAddr::from(SocketAddr::new(ip, 0))),
        None => Ok(()),
    }
}

fn probe_tcp(src: Option<IpAddr>, target: SocketAddr, timeout: Duration) -> std::io::Result<Reach> {
    let deadline = Instant::now() + timeout;
    let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
    bind_source(&socket, src)?;
    if let Err(err) = socket.connect_timeout(&target.into(), timeout) {
        return classify(&err).ok_or(err);
    }
    let mut stream: TcpStream = socket.into();
    let payload = nonce();
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    stream.set_read_timeout(Some(remaining))?;
    stream.set_write_timeout(Some(remaining))?;
    let mut echo = vec![0; payload.len()];
    let exchanged = stream
        .write_all(&payload)
        .and_then(|()| stream.read_exact(&mut echo));
    match exchanged {
        Ok(()) if echo == payload => Ok(Reach::Open),
        Ok(()) => Ok(Reach::TimedOut),
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => Ok(Reach::Refused),
        Err(err) => classify(&err).ok_or(err),
    }
}

fn probe_udp(src: Option<IpAddr>, target: SocketAddr, timeout: Duration) -> std::io::Result<Reach> {
    let deadline = Instant::now() + timeout;
    let socket = Socket::new(Domain::for_address(target), Type::DGRAM, None)?;
    bind_source(&socket, src)?;
    socket.connect(&target.into())?;
    let socket: UdpSocket = socket.into();
    let payload = nonce();
    let mut buf = [0u8; 256];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Ok(Reach::TimedOut);
        }
        // Resend now and then: the first datagram may wait on neighbour
        // resolution, and a lost one must not fail the probe.
        if let Err(err) = socket.send(&payload) {
            return classify(&err).ok_or(err);
        }
        socket.set_read_timeout(Some(remaining.min(Duration::from_millis(200))))?;
        match socket.recv(&mut buf) {
            Ok(n) if buf[..n] == payload[..] => return Ok(Reach::Open),
            Ok(_) => {}
            Err(err) => match classify(&err) {
                Some(Reach::TimedOut) => {}
                Some(reach) => return Ok(reach),
                None => return Err(err),
            },
        }
    }
}

/// A simulated host: one network namespace with `eth0` on its [`SimNet`].
/// Dropping it kills every process inside and deletes the namespace.
pub struct SimHost {
    net: Arc<NetInner>,
    name: String,
    ns: String,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
    extra: Mutex<Vec<IpNet>>,
    forwards: Mutex<Vec<Forward>>,
}

impl std::fmt::Debug for SimHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimHost")
            .field("name", &self.name)
            .field("netns", &self.ns)
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
            .finish_non_exhaustive()
    }
}

impl SimHost {
    /// The host's name (as given to [`SimNet::add_host`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's name, for `ip netns exec`.
    pub fn netns(&self) -> &str {
        &self.ns
    }

    /// The primary IPv4 address of `eth0`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.ipv4
    }

    /// The primary IPv6 address of `eth0`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.ipv6
    }

    /// Every address of `eth0`: the primary IPv4, the primary IPv6, then the
    /// extra ones in the order they were added.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut all = vec![IpAddr::V4(self.ipv4), IpAddr::V6(self.ipv6)];
        all.extend(lock(&self.extra).iter().map(IpNet::addr));
        all
    }

    fn add_onlink_route(&self, prefix: IpNet) -> Result<()> {
        let family = if prefix.addr().is_ipv4() { "-4" } else { "-6" };
        let prefix = prefix.to_string();
        ip(&[
            family, "-n", &self.ns, "route", "replace", &prefix, "dev", "eth0",
        ])
    }

    /// Adds an address (e.g. `203.0.113.7/24`, a peer outside the cluster)
    /// to `eth0`, and an on-link route for its prefix to every other host of
    /// the net, present and future, so they can reach it over the bridge.
    /// Use a documentation range. Probes choose it as source with
    /// [`SimHost::probe_tcp_from`] / [`SimHost::probe_udp_from`].
    pub fn add_address(&self, address: IpNet) -> Result<()> {
        let cidr = address.to_string();
        if address.addr().is_ipv4() {
            ip(&["-n", &self.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        } else {
            ip(&["-n", &self.ns, "addr", "add", &cidr, "dev", "eth0", "nodad"])?;
        }
        lock(&self.extra).push(address);
        let prefix = address.trunc();
        {
            let mut routes = lock(&self.net.routes);
            if !routes.contains(&prefix) {
                routes.push(prefix);
            }
        }
        let others: Vec<String> = lock(&self.net.hosts)
            .iter()
            .filter(|ns| **ns != self.ns)
            .cloned()
            .collect();
        let family = if prefix.addr().is_ipv4() { "-4" } else { "-6" };
        let prefix = prefix.to_string();
        for ns in others {
            ip(&[
                family, "-n", &ns, "route", "replace", &prefix, "dev", "eth0",
            ])?;
        }
        Ok(())
    }

    /// A command that runs `program` inside this host's namespace
    /// (`ip netns exec <netns> <program>`); add arguments and env as usual.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// [`SimHost::command`] for tokio (killed on drop).
    pub fn tokio_command(&self, program: impl AsRef<std::ffi::OsStr>) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(program)
            .kill_on_drop(true);
        cmd
    }

    /// Runs `args[0] args[1..]` in the namespace to completion and returns its
    /// stdout; fails with its stderr when it exits non-zero.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| Error::Invalid("exec needs a program".into()))?;
        let out = self
            .command(program)
            .args(rest)
            .output()
            .map_err(Error::io(format!("running {program} in {}", self.ns)))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Command {
                command: format!("ip netns exec {} {}", self.ns, args.join(" ")),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    /// Starts a TCP echo server on `[::]:port` (dual-stack; `port` 0 picks
    /// one): every connection gets back what it sends first. Stops on drop.
    pub fn listen_tcp(&self, port: u16) -> Result<EchoListener> {
        let listener = in_netns(&self.ns, || {
            let socket = Socket::new(Domain::IPV6, Type::STREAM, None)?;
            socket.set_only_v6(false)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SockAddr::from(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
                port,
            )))?;
            socket.listen(128)?;
            socket.set_nonblocking(true)?;
            Ok(TcpListener::from(socket))
        })?;
        let port = listener
            .local_addr()
            .map_err(Error::io("reading the listener's port"))?
            .port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || tcp_echo(&listener, &flag));
        Ok(EchoListener {
            port,
            stop,
            threads: vec![thread],
        })
    }

    /// Starts a UDP echo server on `port` of every address the host has now
    /// (one socket per address, so replies leave from the address the probe
    /// was sent to; `port` 0 picks one). Stops on drop.
    pub fn listen_udp(&self, port: u16) -> Result<EchoListener> {
        let addresses = self.addresses();
        let sockets = in_netns(&self.ns, || {
            let mut port = port;
            let mut sockets = Vec::new();
            for address in addresses {
                let socket = UdpSocket::bind(SocketAddr::new(address, port))?;
                port = socket.local_addr()?.port();
                socket.set_read_timeout(Some(POLL * 5))?;
                sockets.push(socket);
            }
            Ok((port, sockets))
        })?;
        let (port, sockets) = sockets;
        let stop = Arc::new(AtomicBool::new(false));
        let threads = sockets
            .into_iter()
            .map(|socket| {
                let flag = Arc::clone(&stop);
                std::thread::spawn(move || udp_echo(&socket, &flag))
            })
            .collect();
        Ok(EchoListener {
            port,
            stop,
            threads,
        })
    }

    /// Whether TCP `target` answers from this host within `timeout`
    /// (connect, then the echo of a payload).
    pub fn probe_tcp(&self, target: impl Into<SocketAddr>, timeout: Duration) -> Result<Reach> {
        let target = target.into();
        in_netns(&self.ns, || probe_tcp(None, target, timeout))
    }

    /// [`SimHost::probe_tcp`] from source address `src` (one of this host's).
    pub fn probe_tcp_from(
        &self,
        src: IpAddr,
        target: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<Reach> {
        let target = target.into();
        in_netns(&self.ns, || probe_tcp(Some(src), target, timeout))
    }

    /// Whether UDP `target` echoes a datagram to this host within `timeout`
    /// (resent every 200 ms).
    pub fn probe_udp(&self, target: impl Into<SocketAddr>, timeout: Duration) -> Result<Reach> {
        let target = target.into();
        in_netns(&self.ns, || probe_udp(None, target, timeout))
    }

    /// [`SimHost::probe_udp`] from source address `src` (one of this host's).
    pub fn probe_udp_from(
        &self,
        src: IpAddr,
        target: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<Reach> {
        let target = target.into();
        in_netns(&self.ns, || probe_udp(Some(src), target, timeout))
    }

    /// Sends this host's traffic for `dst` (a loopback address such as
    /// `127.0.0.2/32`) to `gateway` over `eth0`, and accepts loopback
    /// addresses on the wire (`route_localnet`): what an attacker next to a
    /// node does to reach the node's 127.0.0.0/8 services (CVE-2020-8558).
    /// Changes this host's namespace only.
    pub fn route_localnet_via(&self, dst: IpNet, gateway: IpAddr) -> Result<()> {
        self.exec(&["sysctl", "-qw", "net.ipv4.conf.all.route_localnet=1"])?;
        self.exec(&["sysctl", "-qw", "net.ipv4.conf.eth0.route_localnet=1"])?;
        let (dst, gw, src) = (dst.to_string(), gateway.to_string(), self.ipv4.to_string());
        // The local table would answer for 127.0.0.0/8 first: look up a
        // table of our own before it.
        ip(&[
            "-n", &self.ns, "rule", "add", "pref", "50", "to", &dst, "lookup", "50",
        ])?;
        ip(&[
            "-n", &self.ns, "rule", "del", "pref", "0", "lookup", "local",
        ])?;
        ip(&[
            "-n", &self.ns, "rule", "add", "pref", "100", "lookup", "local",
        ])?;
        ip(&[
            "-n", &self.ns, "route", "add", &dst, "via", &gw, "dev", "eth0", "src", &src, "table",
            "50",
        ])
    }

    /// Whether one UDP datagram sent by `from` to `to` (an address of this
    /// host, bound here for the check) arrives within `timeout`: a one-way
    /// probe, for destinations a reply could not come back from.
    pub fn udp_arrives(&self, from: &SimHost, to: SocketAddr, timeout: Duration) -> Result<bool> {
        let rx = in_netns(&self.ns, || UdpSocket::bind(to))?;
        let payload = nonce();
        in_netns(&from.ns, || {
            let tx = UdpSocket::bind(SocketAddr::new(
                if to.is_ipv4() {
                    IpAddr::V4(Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(Ipv6Addr::UNSPECIFIED)
                },
                0,
            ))?;
            tx.send_to(&payload, to)
        })?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 256];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            rx.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(Error::io("udp timeout"))?;
            match rx.recv(&mut buf) {
                Ok(n) if buf[..n] == payload[..] => return Ok(true),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(false)
    }

    /// A TCP connection from this host to `target`, kept open by the
    /// caller (the socket lives in this host's namespace).
    pub fn connect_tcp(
        &self,
        target: impl Into<SocketAddr>,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let target = target.into();
        in_netns(&self.ns, || {
            let socket = Socket::new(Domain::for_address(target), Type::STREAM, None)?;
            socket.connect_timeout(&target.into(), timeout)?;
            Ok(socket.into())
        })
    }

    /// Whether an ICMP (IPv4) or ICMPv6 message of `icmp_type`/`code`, sent
    /// by `from` to `to` (one of this host's addresses), reaches this host's
    /// ICMP layer (a raw socket here, which sees what INPUT let through)
    /// within `timeout`. The message carries a nonce, so only this probe
    /// counts.
    pub fn icmp_arrives(
        &self,
        from: &SimHost,
        to: IpAddr,
        icmp_type: u8,
        code: u8,
        timeout: Duration,
    ) -> Result<bool> {
        let (domain, protocol) = match to {
            IpAddr::V4(_) => (Domain::IPV4, socket2::Protocol::ICMPV4),
            IpAddr::V6(_) => (Domain::IPV6, socket2::Protocol::ICMPV6),
        };
        let rx = in_netns(&self.ns, || Socket::new(domain, Type::RAW, Some(protocol)))?;
        let payload = nonce();
        // A fresh identifier per probe: conntrack tracks ICMP requests by
        // (type, code, id), and an earlier probe's flow must not make this
        // one ESTABLISHED.
        static ICMP_ID: AtomicU64 = AtomicU64::new(1);
        let id = (ICMP_ID.fetch_add(1, Ordering::Relaxed) as u16).to_be_bytes();
        let mut msg = vec![icmp_type, code, 0, 0, id[0], id[1], 0, 1];
        msg.extend_from_slice(&payload);
        if to.is_ipv4() {
            // ICMPv6's checksum is the kernel's; ICMP's is ours.
            let sum = checksum(&msg);
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
        }
        in_netns(&from.ns, || {
            let tx = Socket::new(domain, Type::RAW, Some(protocol))?;
            tx.send_to(&msg, &SockAddr::from(SocketAddr::new(to, 0)))
        })?;
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        let mut rx = rx;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            rx.set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .map_err(Error::io("raw socket timeout"))?;
            let n = match rx.read(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(Error::io("reading the raw socket")(e)),
            };
            // IPv4 raw sockets deliver the IP header too.
            let icmp = match to {
                IpAddr::V4(_) => buf
                    .get(usize::from(buf[0] & 0x0f) * 4..n)
                    .unwrap_or_default(),
                IpAddr::V6(_) => &buf[..n],
            };
            if icmp.len() >= 8 + payload.len()
                && icmp[0] == icmp_type
                && icmp[1] == code
                && icmp[8..8 + payload.len()] == payload[..]
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Makes `127.0.0.1:port` inside the namespace forward to `127.0.0.1:port`
    /// of the test process's namespace, so a process in the host (an agent)
    /// reaches the apiserver or moto with the same URL and kubeconfig as the
    /// tests. Lives as long as this host.
    pub fn forward_loopback(&self, port: u16) -> Result<()> {
        self.forward_to_loopback(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port), port)
    }

    /// Makes `listen` inside the namespace (an address the host already
    /// has) forward to `127.0.0.1:port` of the test process's namespace: the
    /// `kubernetes` Service address in front of the apiserver, for pods of a
    /// real kubelet on this host. Lives as long as this host.
    pub fn forward_to_loopback(&self, listen: SocketAddr, port: u16) -> Result<()> {
        let listener = in_netns(&self.ns, || {
            let listener = TcpListener::bind(listen)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (flag, open) = (Arc::clone(&stop), Arc::clone(&conns));
        let thread = std::thread::spawn(move || forward(&listener, port, &flag, &open));
        lock(&self.forwards).push(Forward {
            stop,
            conns,
            thread: Some(thread),
        });
        Ok(())
    }
}

impl Drop for SimHost {
    fn drop(&mut self) {
        lock(&self.forwards).clear();
        lock(&self.net.hosts).remove(&self.ns);
        netns::delete(&self.ns);
    }
}

/// A running echo server on a [`SimHost`]; stops when dropped.
pub struct EchoListener {
    port: u16,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for EchoListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchoListener")
            .field("port", &self.port)
            .finish()
    }
}

impl EchoListener {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for EchoListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn tcp_echo(listener: &TcpListener, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((mut stream, _)) => {
                std::thread::spawn(move || {
                    let _ = stream.set_nonblocking(false);
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                    // Echo until the peer closes (or 5 s of silence), so a
                    // long-lived connection can be checked again later.
                    let mut buf = [0u8; 512];
                    while let Ok(n) = stream.read(&mut buf) {
                        if n == 0 || stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn udp_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// A loopback forwarder owned by a [`SimHost`].
struct Forward {
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        for conn in lock(&self.conns).drain(..) {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

fn forward(listener: &TcpListener, port: u16, stop: &AtomicBool, conns: &Mutex<Vec<TcpStream>>) {
    while !stop.load(Ordering::Relaxed) {
        let inside = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(POLL);
                continue;
            }
        };
        // This thread never entered the host's namespace: the connect goes
        // to the test process's own loopback.
        let Ok(outside) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
            continue;
        };
        let _ = inside.set_nonblocking(false);
        let (Ok(inside2), Ok(outside2)) = (inside.try_clone(), outside.try_clone()) else {
            continue;
        };
        {
            let mut open = lock(conns);
            open.retain(|c| c.peer_addr().is_ok());
            if let (Ok(a), Ok(b)) = (inside.try_clone(), outside.try_clone()) {
                open.push(a);
                open.push(b);
            }
        }
        std::thread::spawn(move || pipe(inside, outside));
        std::thread::spawn(move || pipe(outside2, inside2));
    }
}

/// Copies `from` to `to` until end-of-file, then passes the end on.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

/// The Internet checksum (RFC 1071) of `data`.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}
