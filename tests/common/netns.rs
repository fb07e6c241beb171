//! A real network namespace for tests: a veth pair to the host and a
//! firewall inside the namespace. Include it from a test file with
//! `#[path = "common/netns.rs"] mod netns;`.
//!
//! Addresses come only from 198.18.0.0/15 (RFC 2544 benchmarking range), one
//! /30 per namespace: host side .1, namespace side .2. Needs root and
//! `ip netns`; the firewall uses `iptables` (or `nft` when iptables is
//! missing). Everything is removed on drop. Every command is bounded in time.
//!
//! [`NetNs::create_delayed`] joins the namespace by a pair of TUN devices
//! instead, with a thread of the test carrying each IP packet from one to
//! the other after a delay the test sets: the path delay of a distant
//! client, for kernels without `sch_netem` (a userspace relay of TCP would
//! not do: it acknowledges at once, so the server's TCP would see no delay).
#![allow(dead_code)]

use std::collections::VecDeque;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// 198.18.0.0/15 holds 2^15 /30 subnets.
const SUBNETS: u32 = 1 << 15;
const BASE: u32 = u32::from_be_bytes([198, 18, 0, 0]);
/// Longest any single `ip`/`iptables`/`nft` call may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// Name prefix of every namespace this helper creates (pid follows).
const PREFIX: &str = "turnd-t";
/// Where `ip netns exec` finds per-namespace files to put over /etc.
const ETC_NETNS: &str = "/etc/netns";

static COUNTER: AtomicU32 = AtomicU32::new(0);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firewall {
    Iptables,
    Nft,
}

pub struct NetNs {
    name: String,
    /// Host-side veth name, once created.
    host_if: Option<String>,
    /// The namespace holding the "host" end, when not the host itself.
    upstream: Option<String>,
    host_ip: Ipv4Addr,
    ns_ip: Ipv4Addr,
    firewall: Firewall,
    /// `/etc/netns/NAME`, once [`NetNs::set_hosts`] made it.
    etc: Option<PathBuf>,
    /// The thread carrying packets between the TUN pair of
    /// [`NetNs::create_delayed`].
    wire: Option<Wire>,
}

impl NetNs {
    /// A namespace whose only way out is a veth to the host, where all
    /// outgoing UDP is dropped and outgoing TCP is allowed only to port 443
    /// (everything else outgoing, except on `lo`, is dropped too; IPv6 as
    /// well). Panics with a clear message when not root or when network
    /// namespaces are unavailable.
    pub fn create_udp_blocked() -> NetNs {
        Self::create(None, true)
    }

    /// A namespace joined to the host by a veth pair, with no firewall (add
    /// one with [`NetNs::drop_inbound_udp`]) and no default route: it reaches
    /// the host end of its /30 (and what the host serves there), nothing else.
    pub fn create_open() -> NetNs {
        Self::create(None, false)
    }

    /// A namespace joined to `upstream` (another namespace) by a veth pair,
    /// with no firewall and no route but its /30: `host_ip()` is the
    /// upstream end, the only address it reaches. Namespaces do not forward
    /// (ip_forward is off in each new one), so nothing behind `upstream` is
    /// reachable from here except through a program there, such as a proxy.
    pub fn create_behind(upstream: &NetNs) -> NetNs {
        Self::create(Some(upstream.name()), false)
    }

    /// A namespace joined to the host by a pair of TUN devices (named and
    /// addressed as the veth pairs are), no firewall and no route but its
    /// /30, and a thread of this process that carries every IP packet
    /// between them `one_way` after it left, in each direction (changed
    /// with [`NetNs::set_delay`]): a path with a round trip of twice that.
    /// The devices go with the thread when dropped (or with the process).
    pub fn create_delayed(one_way: Duration) -> NetNs {
        preflight();
        let mut ns = Self::add(None, pick_firewall());
        let start = std::process::id().wrapping_mul(97).wrapping_add(COUNTER.load(Ordering::Relaxed).wrapping_mul(7919));
        let used = String::from_utf8_lossy(&run(Command::new("ip").args(["-o", "-4", "addr", "show"])).stdout).into_owned();
        for k in 0..256u32 {
            let idx = start.wrapping_add(k) % SUBNETS;
            let net = BASE + 4 * idx;
            let (host_ip, ns_ip) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
            if used.contains(&format!(" {host_ip}/")) || used.contains(&format!(" {ns_ip}/")) {
                continue;
            }
            let (hif, nif) = (format!("tdh{idx:x}"), format!("tdn{idx:x}"));
            // Creating the host's device (exclusively) reserves the subnet.
            let host_tun = match open_tun(&hif) {
                Ok(fd) => fd,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) || e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => panic!("netns: cannot create TUN device {hif} (is /dev/net/tun there?): {e}"),
            };
            ns.host_if = Some(hif.clone());
            let ns_tun = ns.in_ns(|| open_tun(&nif)).unwrap_or_else(|e| panic!("netns: cannot create TUN device {nif} in {}: {e}", ns.name));
            ns.host_ip = host_ip;
            ns.ns_ip = ns_ip;
            // The thread owns both devices from here: dropping `ns` stops it.
            ns.wire = Some(Wire::start(host_tun, ns_tun, one_way));
            must(Command::new("ip").args(["addr", "add", &format!("{host_ip}/30"), "dev", &hif]));
            must(Command::new("ip").args(["link", "set", &hif, "up"]));
            must(&mut ns.ip_cmd(&["addr", "add", &format!("{ns_ip}/30"), "dev", &nif]));
            must(&mut ns.ip_cmd(&["link", "set", &nif, "up"]));
            must(&mut ns.ip_cmd(&["link", "set", "lo", "up"]));
            return ns;
        }
        panic!("netns: no free /30 in 198.18.0.0/15");
    }

    /// The delay each way of a [`NetNs::create_delayed`] namespace, for
    /// packets that leave from now on.
    pub fn set_delay(&self, one_way: Duration) {
        let w = self.wire.as_ref().expect("netns: set_delay needs a namespace from create_delayed");
        w.delay_us.store(one_way.as_micros() as u64, Ordering::Relaxed);
    }

    /// A namespace named uniquely for this process and call, with nothing
    /// in it yet (removed when the result is dropped).
    fn add(upstream: Option<&str>, firewall: Firewall) -> NetNs {
        reap_stale();
        let pid = std::process::id();
        let mut ns = None;
        for _ in 0..16 {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{PREFIX}{pid}-{n}");
            let out = run(Command::new("ip").args(["netns", "add", &name]));
            if out.status.success() {
                ns = Some(NetNs {
                    name,
                    host_if: None,
                    upstream: upstream.map(str::to_owned),
                    host_ip: Ipv4Addr::UNSPECIFIED,
                    ns_ip: Ipv4Addr::UNSPECIFIED,
                    firewall,
                    etc: None,
                    wire: None,
                });
                break;
            }
            if !stderr(&out).contains("exist") {
                panic!("netns: `ip netns add {name}` failed: {}", stderr(&out));
            }
        }
        // From here on, a panic drops `ns`, which removes what was made.
        ns.expect("netns: no free namespace name")
    }

    fn create(upstream: Option<&str>, with_firewall: bool) -> NetNs {
        preflight();
        // Open namespaces may get a firewall later (drop_inbound_udp).
        let firewall = pick_firewall();
        let pid = std::process::id();

        // 1. The namespace, with a name unique to this process and call.
        let mut ns = Self::add(upstream, firewall);

        // 2. A veth pair named after its /30: creating the link is the atomic
        //    reservation of the subnet between parallel tests and processes.
        let start = pid.wrapping_mul(97).wrapping_add(COUNTER.load(Ordering::Relaxed).wrapping_mul(7919));
        let used = run(Command::new("ip").args(["-o", "-4", "addr", "show"]));
        let mut used = String::from_utf8_lossy(&used.stdout).into_owned();
        if let Some(u) = upstream {
            used += &String::from_utf8_lossy(&run(Command::new("ip").args(["-n", u, "-o", "-4", "addr", "show"])).stdout);
        }
        for k in 0..256u32 {
            let idx = start.wrapping_add(k) % SUBNETS;
            let net = BASE + 4 * idx;
            let (host_ip, ns_ip) = (Ipv4Addr::from(net + 1), Ipv4Addr::from(net + 2));
            if used.contains(&format!(" {host_ip}/")) || used.contains(&format!(" {ns_ip}/")) {
                continue;
            }
            let (hif, nif) = (format!("tdh{idx:x}"), format!("tdn{idx:x}"));
            // On the host end: `ip` itself, or `ip -n UPSTREAM`.
            let up = |args: &[&str]| {
                let mut c = Command::new("ip");
                if let Some(u) = upstream {
                    c.args(["-n", u]);
                }
                c.args(args);
                c
            };
            let out = run(&mut up(&["link", "add", &hif, "type", "veth", "peer", "name", &nif, "netns", &ns.name]));
            if !out.status.success() {
                if stderr(&out).contains("exist") {
                    continue;
                }
                panic!("netns: cannot create a veth pair: {}", stderr(&out));
            }
            ns.host_if = Some(hif.clone());
            ns.host_ip = host_ip;
            ns.ns_ip = ns_ip;
            must(&mut up(&["addr", "add", &format!("{host_ip}/30"), "dev", &hif]));
            must(&mut up(&["link", "set", &hif, "up"]));
            must(&mut ns.ip_cmd(&["addr", "add", &format!("{ns_ip}/30"), "dev", &nif]));
            must(&mut ns.ip_cmd(&["link", "set", &nif, "up"]));
            must(&mut ns.ip_cmd(&["link", "set", "lo", "up"]));
            break;
        }
        assert!(ns.host_if.is_some(), "netns: no free /30 in 198.18.0.0/15");

        // 3. The firewall inside the namespace.
        if with_firewall {
            ns.install_firewall();
        }
        ns.wait_link_up();
        ns
    }

    /// Inside the namespace, drops incoming UDP to ports `low..=high` that
    /// arrives over the veth (not over `lo`): a firewall in front of a
    /// relay's port range, which traffic between two sockets of the
    /// namespace itself never crosses.
    pub fn drop_inbound_udp(&self, low: u16, high: u16) {
        match self.firewall {
            Firewall::Iptables => {
                let range = format!("{low}:{high}");
                must(self.command("iptables").args(["-w", "5", "-A", "INPUT", "!", "-i", "lo", "-p", "udp", "--dport", &range, "-j", "DROP"]));
            }
            Firewall::Nft => {
                let rules = format!(
                    "table inet turnd_test_in {{\n\
                       chain input {{\n\
                         type filter hook input priority 0; policy accept;\n\
                         iifname != \"lo\" udp dport {low}-{high} counter drop\n\
                       }}\n\
                     }}\n"
                );
                let path = std::env::temp_dir().join(format!("{}-in.nft", self.name));
                std::fs::write(&path, rules).expect("write nft rules");
                let out = run(self.command("nft").arg("-f").arg(&path));
                let _ = std::fs::remove_file(&path);
                assert!(out.status.success(), "netns: nft -f failed: {}", stderr(&out));
            }
        }
    }

    /// Removes what [`NetNs::drop_inbound_udp`] added.
    pub fn allow_inbound_udp(&self) {
        match self.firewall {
            Firewall::Iptables => {
                must(self.command("iptables").args(["-w", "5", "-F", "INPUT"]));
            }
            Firewall::Nft => {
                must(self.command("nft").args(["delete", "table", "inet", "turnd_test_in"]));
            }
        }
    }

    /// The `/etc/hosts` of programs run with [`NetNs::command`]: `ip netns
    /// exec` bind-mounts `/etc/netns/NAME/hosts` over `/etc/hosts` when that
    /// file exists. `names` are (address, host name) pairs; localhost is
    /// always there. Each name is also listed with a trailing dot, as
    /// Chromium's WebRTC looks TURN servers up by their absolute name
    /// (`turn.example.` finds nothing in a hosts file that has only
    /// `turn.example`). Removed with the namespace.
    pub fn set_hosts(&mut self, names: &[(Ipv4Addr, &str)]) {
        let dir = PathBuf::from(ETC_NETNS).join(&self.name);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("netns: create {}: {e}", dir.display()));
        self.etc = Some(dir.clone());
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n");
        for (ip, name) in names {
            text += &format!("{ip} {name} {name}.\n");
        }
        std::fs::write(dir.join("hosts"), text).unwrap_or_else(|e| panic!("netns: write {}/hosts: {e}", dir.display()));
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Address of the host end of the veth (reachable from the namespace).
    pub fn host_ip(&self) -> Ipv4Addr {
        self.host_ip
    }

    /// Address of the namespace end of the veth.
    pub fn ns_ip(&self) -> Ipv4Addr {
        self.ns_ip
    }

    /// Name of the host end of the veth (on the host, or in `upstream`).
    pub fn host_if(&self) -> String {
        self.host_if.clone().expect("the veth exists once created")
    }

    /// Name of the namespace end of the veth (inside the namespace).
    pub fn ns_if(&self) -> String {
        self.host_if.as_deref().expect("the veth exists once created").replacen("tdh", "tdn", 1)
    }

    pub fn firewall(&self) -> Firewall {
        self.firewall
    }

    /// `program` run inside the namespace (`ip netns exec NAME program`).
    /// The caller bounds it (e.g. by running `timeout` as the program).
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A TCP listener bound to `addr` inside the namespace, typically
    /// `127.0.0.1:0` on the namespace's own `lo`: how a test serves
    /// something (e.g. a web page) to programs in the namespace without
    /// opening its firewall (outgoing TCP on `lo` is allowed; nothing leaves
    /// the namespace). A short-lived helper thread joins the namespace
    /// (setns) and makes the socket, which stays in the namespace; the
    /// calling thread's own namespace is untouched.
    pub fn tcp_listener(&self, addr: SocketAddr) -> TcpListener {
        self.in_ns(|| TcpListener::bind(addr).unwrap_or_else(|e| panic!("netns: bind {addr} in {}: {e}", self.name)))
    }

    /// A TCP connection from inside the namespace to `to` (made the same
    /// way as [`NetNs::tcp_listener`]; connecting is bounded by 5 s).
    pub fn tcp_connect(&self, to: SocketAddr) -> TcpStream {
        self.in_ns(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap_or_else(|e| panic!("netns: connect to {to} from {}: {e}", self.name)))
    }

    /// Runs `f` on a short-lived helper thread that joined the namespace
    /// (setns): what it makes (sockets, devices) belongs to the namespace,
    /// and the calling thread's own namespace is untouched.
    fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).unwrap_or_else(|e| panic!("netns: open {path}: {e}"));
                // SAFETY: a valid namespace fd; setns only changes this
                // helper thread's network namespace, and the thread ends here.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "netns: setns({path}): {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// A UDP socket bound to `addr` inside the namespace (made the same way
    /// as [`NetNs::tcp_listener`]): a peer that receives what the host sends
    /// over the veth (incoming traffic is not filtered).
    pub fn udp_socket(&self, addr: SocketAddr) -> std::net::UdpSocket {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("netns: open {path}: {e}"));
                // SAFETY: as in tcp_listener: only this helper thread moves.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "netns: setns({path}): {}", std::io::Error::last_os_error());
                std::net::UdpSocket::bind(addr).unwrap_or_else(|e| panic!("netns: bind {addr} in {}: {e}", self.name))
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Outgoing UDP packets the namespace's firewall has dropped so far.
    pub fn udp_drops(&self) -> u64 {
        match self.firewall {
            Firewall::Iptables => {
                // `[packets:bytes] -A OUTPUT -p udp -j DROP`
                let out = must(self.command("iptables-save").arg("-c"));
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let line = text
                    .lines()
                    .find(|l| l.contains("-A OUTPUT -p udp") && l.ends_with("-j DROP"))
                    .unwrap_or_else(|| panic!("netns: no UDP drop rule in:\n{text}"));
                line.trim_start_matches('[').split(':').next().and_then(|v| v.parse().ok()).expect("iptables counter")
            }
            Firewall::Nft => {
                // `meta l4proto udp counter packets N bytes M drop`
                let out = must(self.command("nft").args(["list", "chain", "inet", "turnd_test", "output"]));
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let line = text
                    .lines()
                    .find(|l| l.contains("l4proto udp") && l.contains("drop"))
                    .unwrap_or_else(|| panic!("netns: no UDP drop rule in:\n{text}"));
                line.split("packets ").nth(1).and_then(|r| r.split_whitespace().next()).and_then(|v| v.parse().ok()).expect("nft counter")
            }
        }
    }

    /// The firewall rules as the tool lists them (for failure messages).
    pub fn firewall_rules(&self) -> String {
        let out = match self.firewall {
            Firewall::Iptables => run(self.command("iptables-save").arg("-c")),
            Firewall::Nft => run(self.command("nft").args(["list", "ruleset"])),
        };
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ip_cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["-n", &self.name]).args(args);
        c
    }

    fn install_firewall(&self) {
        match self.firewall {
            Firewall::Iptables => {
                for tool in ["iptables", "ip6tables"] {
                    if tool == "ip6tables" && !have(tool) {
                        continue;
                    }
                    for rule in [
                        &["-A", "OUTPUT", "-p", "udp", "-j", "DROP"][..],
                        &["-A", "OUTPUT", "-p", "tcp", "--dport", "443", "-j", "ACCEPT"],
                        &["-A", "OUTPUT", "-o", "lo", "-j", "ACCEPT"],
                        &["-P", "OUTPUT", "DROP"],
                    ] {
                        must(self.command(tool).args(["-w", "5"]).args(rule));
                    }
                }
            }
            Firewall::Nft => {
                let rules = "table inet turnd_test {\n\
                               chain output {\n\
                                 type filter hook output priority 0; policy drop;\n\
                                 meta l4proto udp counter drop\n\
                                 tcp dport 443 accept\n\
                                 oifname \"lo\" accept\n\
                               }\n\
                             }\n";
                let path = std::env::temp_dir().join(format!("{}.nft", self.name));
                std::fs::write(&path, rules).expect("write nft rules");
                let out = run(self.command("nft").arg("-f").arg(&path));
                let _ = std::fs::remove_file(&path);
                assert!(out.status.success(), "netns: nft -f failed: {}", stderr(&out));
            }
        }
    }

    /// The namespace end reports carrier once both ends are up (bounded).
    fn wait_link_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let out = run(&mut self.ip_cmd(&["-br", "-4", "addr", "show", "up"]));
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            if text.lines().any(|l| l.contains(&self.ns_ip.to_string()) && l.contains(" UP ")) {
                return;
            }
            assert!(Instant::now() < deadline, "netns: veth in {} not up within 5 s:\n{text}", self.name);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // The TUN devices of create_delayed close with their thread.
        drop(self.wire.take());
        // Deleting the namespace destroys its veth end and with it the pair.
        let _ = try_run(Command::new("ip").args(["netns", "del", &self.name]));
        // `ip netns del` leaves /etc/netns/NAME alone.
        if let Some(etc) = self.etc.take() {
            let _ = std::fs::remove_dir_all(etc);
        }
        if let Some(hif) = self.host_if.as_ref().filter(|_| self.upstream.is_none()) {
            // The kernel tears the namespace down asynchronously: give it a
            // moment, then delete the host end ourselves if still there.
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && link_exists(hif) {
                std::thread::sleep(Duration::from_millis(50));
            }
            if link_exists(hif) {
                let _ = try_run(Command::new("ip").args(["link", "del", hif]));
            }
        }
    }
}

fn link_exists(name: &str) -> bool {
    try_run(Command::new("ip").args(["link", "show", "dev", name])).is_ok_and(|o| o.status.success())
}

fn preflight() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "netns: this test builds a real network namespace and needs root (euid is {euid}); CI runs as root"
    );
    assert!(have("ip"), "netns: `ip` (iproute2) is missing");
    let out = run(Command::new("ip").args(["netns", "list"]));
    assert!(out.status.success(), "netns: `ip netns` is not supported here: {}", stderr(&out));
}

fn pick_firewall() -> Firewall {
    if let Ok(v) = std::env::var("TURND_TEST_FIREWALL") {
        return match v.as_str() {
            "iptables" => Firewall::Iptables,
            "nft" => Firewall::Nft,
            _ => panic!("TURND_TEST_FIREWALL must be iptables or nft, not {v:?}"),
        };
    }
    if have("iptables") {
        Firewall::Iptables
    } else if have("nft") {
        Firewall::Nft
    } else {
        panic!("netns: neither iptables nor nft is installed (test.sh installs Debian's iptables)")
    }
}

/// Removes namespaces, and their /etc/netns directories, left by test
/// processes that no longer exist (killed before their drop ran).
fn reap_stale() {
    let dead = |name: &str| {
        let pid = name.strip_prefix(PREFIX).and_then(|rest| rest.split('-').next()).and_then(|p| p.parse::<u32>().ok());
        pid.is_some_and(|pid| !std::path::Path::new(&format!("/proc/{pid}")).exists())
    };
    let out = run(Command::new("ip").args(["netns", "list"]));
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if dead(name) {
            let _ = run(Command::new("ip").args(["netns", "del", name]));
        }
    }
    for entry in std::fs::read_dir(ETC_NETNS).into_iter().flatten().flatten() {
        if dead(&entry.file_name().to_string_lossy()) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn have(program: &str) -> bool {
    run(Command::new("sh").arg("-c").arg(format!("command -v {program}"))).status.success()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Runs a command to completion, killing it after CMD_TIMEOUT; panics if it
/// cannot be started or times out.
fn run(cmd: &mut Command) -> Output {
    try_run(cmd).unwrap_or_else(|e| panic!("netns: {e}"))
}

/// Runs a command to completion, killing it after CMD_TIMEOUT (never panics:
/// usable from Drop).
fn try_run(cmd: &mut Command) -> Result<Output, String> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    // Drain pipes on threads so a chatty command cannot block on a full pipe.
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut so, &mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = std::io::Read::read_to_end(&mut se, &mut v);
        v
    });
    let deadline = Instant::now() + CMD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{what} did not finish within {CMD_TIMEOUT:?}"));
            }
        }
    };
    Ok(Output { status, stdout: t_out.join().unwrap_or_default(), stderr: t_err.join().unwrap_or_default() })
}

/// Like `run`, but panics when the command fails.
fn must(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let out = run(cmd);
    assert!(out.status.success(), "netns: {what} failed: {}", stderr(&out));
    out
}

/// The thread of a [`NetNs::create_delayed`] namespace: reads IP packets
/// from each TUN device and writes them into the other once the delay has
/// passed, in order. Stops (and closes both devices) when dropped.
struct Wire {
    delay_us: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Wire {
    fn start(host: OwnedFd, ns: OwnedFd, one_way: Duration) -> Wire {
        let delay_us = Arc::new(AtomicU64::new(one_way.as_micros() as u64));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, st) = (delay_us.clone(), stop.clone());
        let thread = std::thread::Builder::new().name("netns-wire".into()).spawn(move || wire_loop(host, ns, &d, &st)).expect("netns: spawn the wire thread");
        Wire { delay_us, stop, thread: Some(thread) }
    }
}

impl Drop for Wire {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Packets waiting on the wire in one direction: when each may go on.
type InFlight = VecDeque<(Instant, Vec<u8>)>;

fn wire_loop(host: OwnedFd, ns: OwnedFd, delay_us: &AtomicU64, stop: &AtomicBool) {
    // [0]: from the namespace, on its way to the host; [1]: the other way.
    let fds = [ns.as_raw_fd(), host.as_raw_fd()];
    let mut queues: [InFlight; 2] = [VecDeque::new(), VecDeque::new()];
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (i, q) in queues.iter_mut().enumerate() {
            while q.front().is_some_and(|(due, _)| *due <= now) {
                let (_, p) = q.pop_front().unwrap();
                // SAFETY: `p` is valid for reads of its length; the
                // descriptor is the open TUN device this thread owns.
                // A packet the device refuses is lost, as on a real wire.
                let _ = unsafe { libc::write(fds[1 - i], p.as_ptr().cast(), p.len()) };
            }
        }
        // Wake for the next packet due, or at least every 20 ms to see `stop`.
        let next = queues.iter().filter_map(|q| q.front().map(|(due, _)| due.saturating_duration_since(now))).min();
        let wait = next.unwrap_or(Duration::from_millis(20)).min(Duration::from_millis(20));
        let mut pfd = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
        let ms = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: `pfd` is an array of two pollfd, valid for the call.
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if n <= 0 {
            continue;
        }
        for (i, p) in pfd.iter().enumerate() {
            if p.revents & libc::POLLIN == 0 {
                continue;
            }
            // Everything the device holds now, each packet stamped as it is read.
            loop {
                // SAFETY: `buf` is valid for writes of its length; the
                // descriptor is the open (non-blocking) TUN device this
                // thread owns.
                let k = unsafe { libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len()) };
                if k <= 0 {
                    break;
                }
                let due = Instant::now() + Duration::from_micros(delay_us.load(Ordering::Relaxed));
                queues[i].push_back((due, buf[..k as usize].to_vec()));
            }
        }
    }
}

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates TUN device `name` (IP packets, no header) in the calling
/// thread's network namespace, failing with EBUSY if it exists; the
/// device lives as long as the returned descriptor (non-blocking).
fn open_tun(name: &str) -> std::io::Result<OwnedFd> {
    assert!(name.len() < 16, "netns: interface name {name} too long");
    // SAFETY: a NUL-terminated path; the flags ask for a new descriptor.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq { name: [0; 16], flags: (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_TUN_EXCL) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` is
    // laid out as (40 bytes), valid for the call; `fd` is open.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}
