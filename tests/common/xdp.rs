//! The rig of the XDP fast path's tests (feature `xdp`): two network
//! namespaces, a client's and a peer's, each joined to the host by a veth
//! pair (`common/netns.rs`, 198.18.0.0/15, and a /64 of 2001:2::/48 each
//! unless IPv4 only); turnd on the host listens on the client's host end
//! and relays from the peer's, with the program attached in native mode to
//! both host ends. The far ends run the pass-through program `xdp_pass`
//! (native XDP on veth delivers redirected frames only to an end that has
//! one) and send with checksum offload off (a veth leaves UDP checksums
//! partial, which a forwarded frame cannot carry).
//!
//! The host ends' `xdp_redirect` counters (ethtool -S) count the frames the
//! program relayed: the client's end what went to the peer, the peer's end
//! what went to the client. Include it from a test file that also has
//! `mod common;` and the `netns` module, with
//! `#[path = "common/xdp.rs"] mod xdp_rig;`. Needs root, `ip netns`,
//! ethtool, and turnd built with `--features xdp`.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::{self, Turnd};
use crate::netns::NetNs;

/// turnd's relay ports on the peer's host end: the harness's range, which
/// `common/call.rs` checks the browsers' relayed candidates against.
pub const RELAY_PORTS: &str = "20000-29999";

/// The client's and the peer's namespaces, turnd between them. The secret
/// is the harness's (`common::SECRET`).
pub struct Rig {
    // turnd goes first, then the namespaces (and with them the veths and
    // their XDP programs and sysctls).
    pub turnd: Turnd,
    pub client_ns: NetNs,
    pub peer_ns: NetNs,
    /// The IPv4 listener, on the client's host end.
    pub server: SocketAddr,
    /// The IPv6 listener, and the IPv6 ends of the veths (client ns, peer
    /// ns); None when the rig is IPv4 only.
    pub server6: Option<SocketAddr>,
    pub ns6: Option<(Ipv6Addr, Ipv6Addr)>,
}

/// Runs `cmd`, failing the test unless it succeeds; its stdout.
pub fn must(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Frames the program sent on with a redirect, as counted on `iface` (a host end).
pub fn redirects(iface: &str) -> u64 {
    must(Command::new("ethtool").args(["-S", iface]))
        .lines()
        .filter(|l| l.contains("xdp_redirect") && !l.contains("err"))
        .filter_map(|l| l.rsplit(':').next()?.trim().parse::<u64>().ok())
        .sum()
}

/// Reads `read` every 50 ms until it gives `want`, for at most `limit`;
/// returns the last value read (for the caller to assert on). For figures
/// turnd publishes with a delay, such as the program's counters, which it
/// reads back about once a second.
pub fn settle<T: PartialEq>(limit: Duration, want: &T, mut read: impl FnMut() -> T) -> T {
    let deadline = Instant::now() + limit;
    loop {
        let v = read();
        if v == *want || Instant::now() >= deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How a rig differs from the IPv4-only one on the client's host address.
#[derive(Default)]
pub struct Opts {
    /// IPv6 too.
    pub ipv6: bool,
    /// turnd listens on 0.0.0.0 (and `::`), the clients still send to the host end.
    pub wildcard: bool,
    /// A command turnd is started under (`Turnd::builder().wrap`).
    pub wrap: Vec<String>,
}

impl Rig {
    /// The rig over IPv4 and IPv6, with `extra` (whole sections, or keys of
    /// `[limits]`, which comes last before `[xdp]`) in turnd's config.
    pub fn start(extra: &str) -> Rig {
        Self::start_with(extra, Opts { ipv6: true, ..Opts::default() })
    }

    /// The rig over IPv4 only: the namespaces get no IPv6 address (a
    /// browser there offers its one IPv4 address as its only candidate).
    pub fn start_v4(extra: &str) -> Rig {
        Self::start_with(extra, Opts::default())
    }

    /// The rig as `opts` say.
    pub fn start_with(extra: &str, opts: Opts) -> Rig {
        let ipv6 = opts.ipv6;
        let (client_ns, peer_ns) = (NetNs::create_open(), NetNs::create_open());
        // IPv6 from 2001:2::/48 (RFC 5180), a /64 per veth named after this
        // process so parallel runs on the host do not clash.
        let p = std::process::id() & 0xffff;
        let v6 = |k: u32, host: u8| format!("2001:2:0:{:x}::{host}", (p << 1 | k) & 0xffff);
        if ipv6 {
            for (k, ns) in [&client_ns, &peer_ns].into_iter().enumerate() {
                let (hif, nif) = (ns.host_if(), ns.ns_if());
                must(Command::new("ip").args(["addr", "add", &format!("{}/64", v6(k as u32, 1)), "dev", &hif, "nodad"]));
                must(ns.command("ip").args(["addr", "add", &format!("{}/64", v6(k as u32, 2)), "dev", &nif, "nodad"]));
            }
        }
        let ns6: Option<(Ipv6Addr, Ipv6Addr)> = ipv6.then(|| (v6(0, 2).parse().unwrap(), v6(1, 2).parse().unwrap()));
        for ns in [&client_ns, &peer_ns] {
            let nif = ns.ns_if();
            must(ns.command("ip").args(["link", "set", "dev", &nif, "xdpdrv", "obj", env!("TURND_XDP_OBJECT"), "program", "xdp_pass"]));
            must(ns.command("ethtool").args(["-K", &nif, "tx", "off"]));
            // The program's route lookup answers only on a forwarding
            // interface (IPv6 too, or turnd warns that it is off).
            for family in ["ipv4", "ipv6"] {
                must(Command::new("sysctl").args(["-qw", &format!("net.{family}.conf.{}.forwarding=1", ns.host_if())]));
            }
        }
        let port = common::free_port();
        let server: SocketAddr = format!("{}:{port}", client_ns.host_ip()).parse().unwrap();
        let server6: Option<SocketAddr> = ipv6.then(|| format!("[{}]:{port}", v6(0, 1)).parse().unwrap());
        // The listeners: the client's host end, or the wildcard addresses.
        let (listen, listen6) = match opts.wildcard {
            true => (format!("0.0.0.0:{port}"), format!("[::]:{port}")),
            false => (server.to_string(), server6.map(|s| s.to_string()).unwrap_or_default()),
        };
        let mut cfg = format!(
            "realm = \"xdp.test\"\nthreads = 2\n[auth]\nsecrets = [\"{}\"]\n\
             [[listen]]\ntransport = \"udp\"\naddress = \"{listen}\"\n",
            common::SECRET
        );
        if let (Some(_), Some((_, peer6))) = (server6, ns6) {
            cfg += &format!(
                "[[listen]]\ntransport = \"udp\"\naddress = \"{listen6}\"\n\
                 [relay]\nip = \"{}\"\nipv6 = \"{}\"\nports = \"{RELAY_PORTS}\"\n\
                 [peers]\nallow = [\"{}/32\", \"{peer6}/128\"]\n",
                peer_ns.host_ip(),
                v6(1, 1),
                peer_ns.ns_ip(),
            );
        } else {
            cfg += &format!(
                "[relay]\nip = \"{}\"\nports = \"{RELAY_PORTS}\"\n[peers]\nallow = [\"{}/32\"]\n",
                peer_ns.host_ip(),
                peer_ns.ns_ip(),
            );
        }
        // No bandwidth caps unless a test sets them (by a reload).
        cfg += &format!(
            "[limits]\nallocation_bandwidth = 0\ntotal_bandwidth = 0\n{extra}\n\
             [xdp]\ninterfaces = [\"{}\", \"{}\"]\nmode = \"native\"\n",
            client_ns.host_if(),
            peer_ns.host_if()
        );
        let turnd = Turnd::builder().wrap(&opts.wrap).config(server, move |_| cfg).start();
        turnd.wait_log("XDP fast path attached");
        Rig { turnd, client_ns, peer_ns, server, server6, ns6 }
    }

    /// (client side, peer side) redirect counts: frames the program relayed
    /// toward the peer and toward the client.
    pub fn redirects(&self) -> (u64, u64) {
        (redirects(&self.client_ns.host_if()), redirects(&self.peer_ns.host_if()))
    }

    /// `turnctl sessions --json`.
    pub fn admin_sessions(&self) -> serde_json::Value {
        let (rc, out) = common::turnctl(&self.turnd, &["sessions", "--json"]);
        assert_eq!(rc, 0, "turnctl sessions: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("turnctl sessions: {e}: {out}"))
    }

    /// The session of the client at `client`, if turnd lists one.
    pub fn session(&self, client: SocketAddr) -> Option<serde_json::Value> {
        let sessions = self.admin_sessions();
        sessions.as_array()?.iter().find(|s| s["client"] == client.to_string()).cloned()
    }

    /// Until the host knows the link-layer address of each namespace's
    /// address (IPv4, and IPv6 when the rig has it; bounded: 5 s): the
    /// program passes a packet to the sockets while its next hop's
    /// neighbour is unresolved, so traffic that must all take the program
    /// waits for this. A datagram from the host to the discard port makes
    /// the kernel resolve it (the namespace answers port unreachable).
    pub fn resolve_neighbours(&self) {
        let mut targets: Vec<(IpAddr, IpAddr, String)> = [&self.client_ns, &self.peer_ns]
            .into_iter()
            .map(|ns| (ns.host_ip().into(), ns.ns_ip().into(), ns.host_if()))
            .collect();
        if let (Some(s6), Some((c6, p6)), Some(r6)) = (self.server6, self.ns6, self.relay6()) {
            targets.push((s6.ip(), c6.into(), self.client_ns.host_if()));
            targets.push((r6, p6.into(), self.peer_ns.host_if()));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (from, to, dev) in targets {
            let s = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap_or_else(|e| panic!("bind {from}: {e}"));
            loop {
                let _ = s.send_to(b"resolve", SocketAddr::new(to, 9));
                let out = must(Command::new("ip").args(["-j", "neigh", "show", "to", &to.to_string(), "dev", &dev]));
                // Usable for the program's lookup (NUD_VALID).
                if ["REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT"].iter().any(|st| out.contains(&format!("\"{st}\""))) {
                    break;
                }
                assert!(Instant::now() < deadline, "the host has not resolved {to} on {dev} within 5 s: {out}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// The relay's IPv6 address (the peer's host end), when the rig has IPv6.
    pub fn relay6(&self) -> Option<IpAddr> {
        let p6 = self.ns6?.1;
        let mut o = p6.octets();
        o[15] = 1;
        Some(Ipv6Addr::from(o).into())
    }
}
