//! Interoperability with an independent, sans-IO Rust TURN client:
//! `turn-client-proto` 0.7.3, driven over a blocking `std::net::UdpSocket`
//! against a real turnd started by the test harness.
//!
//! Every wait is bounded by a deadline; the client's own timers (`poll()` ->
//! `WaitUntil`) decide how long a socket read may block.

mod common;

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use turn_client_proto::api::{
    DelayedMessageOrChannelSend, Transmit, TurnClientApi, TurnConfig, TurnEvent, TurnPollRet,
    TurnRecvRet,
};
use turn_client_proto::types::attribute::Lifetime;
use turn_client_proto::types::message::{ALLOCATE, DATA, REFRESH};
use turn_client_proto::types::stun::attribute::ErrorCode;
use turn_client_proto::types::stun::message::{Message, MessageClass, Method};
use turn_client_proto::types::{AddressFamily, Instant, TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

type TestResult<T> = Result<T, String>;

/// A STUN message seen on the wire, parsed by the test for assertions and diagnostics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StunSeen {
    method: Method,
    class: MessageClass,
    error: Option<u16>,
    lifetime: Option<u32>,
}

fn inspect(data: &[u8]) -> Option<StunSeen> {
    // ChannelData (first two bits 01) does not parse as STUN.
    let msg = Message::from_bytes(data).ok()?;
    Some(StunSeen {
        method: msg.method(),
        class: msg.class(),
        error: msg.attribute::<ErrorCode>().ok().map(|e| e.code()),
        lifetime: msg.attribute::<Lifetime>().ok().map(|l| l.seconds()),
    })
}

fn is_channel_data(data: &[u8]) -> bool {
    data.len() >= 4 && data[0] >> 6 == 0b01
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// TURN REST API credentials expiring at `expiry`, signed with `secret`.
fn rest_credentials(expiry: u64, secret: &str) -> (String, String) {
    let username = format!("{expiry}:alice");
    let password = turnd::auth::rest_password(secret.as_bytes(), &username);
    (username, password)
}

/// Glue between the sans-IO `TurnClientUdp` and a blocking UDP socket.
struct Driver {
    client: TurnClientUdp,
    socket: UdpSocket,
    /// Exactly the local address given to `TurnClientUdp::allocate()`.
    local: SocketAddr,
    server: SocketAddr,
    base: std::time::Instant,
    buf: Vec<u8>,
    events: VecDeque<TurnEvent>,
    peer_data: VecDeque<(SocketAddr, Vec<u8>)>,
    sent: Vec<StunSeen>,
    received: Vec<StunSeen>,
    channel_data_received: usize,
    closed: bool,
}

/// STUN request retransmission schedule: (initial RTO, max RTO, sends, final wait).
type Rto = (Duration, Duration, u32, Duration);

/// Sends at 0, +250ms, +500ms, +1s, +1s, then a final 1s wait: a transaction
/// times out after ~3.75 s instead of the default ~39.5 s.
const NORMAL_RTO: Rto = (Duration::from_millis(250), Duration::from_secs(1), 5, Duration::from_secs(1));

/// For the refusal tests: sends at 0, +100ms, +200ms, then a 300ms final wait
/// (~0.6 s per transaction; loopback answers in well under a millisecond).
const SHORT_RTO: Rto = (Duration::from_millis(100), Duration::from_millis(200), 3, Duration::from_millis(300));

impl Driver {
    fn new(server: SocketAddr, username: &str, password: &str) -> Driver {
        Self::with_rto(server, username, password, NORMAL_RTO)
    }

    fn with_rto(server: SocketAddr, username: &str, password: &str, rto: Rto) -> Driver {
        let socket = UdpSocket::bind(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), 0)).unwrap();
        let local = socket.local_addr().unwrap();
        let mut config = TurnConfig::new(TurnCredentials::new(username, password));
        config.set_allocation_transport(TransportType::Udp);
        config.set_address_family(AddressFamily::IPV4);
        config.set_request_retransmits(rto.0, rto.1, rto.2, rto.3);
        let client = TurnClientUdp::allocate(local, server, config);
        Driver {
            client,
            socket,
            local,
            server,
            base: std::time::Instant::now(),
            buf: vec![0; 65536],
            events: VecDeque::new(),
            peer_data: VecDeque::new(),
            sent: Vec::new(),
            received: Vec::new(),
            channel_data_received: 0,
            closed: false,
        }
    }

    fn now(&self) -> Instant {
        Instant::from_std(self.base)
    }

    fn flush(&mut self) -> io::Result<()> {
        let now = self.now();
        while let Some(transmit) = self.client.poll_transmit(now) {
            if let Some(seen) = inspect(&transmit.data) {
                self.sent.push(seen);
            }
            self.socket.send_to(&transmit.data, transmit.to)?;
        }
        Ok(())
    }

    fn drain_events(&mut self) {
        while let Some(event) = self.client.poll_event() {
            eprintln!("turn client event: {event:?}");
            self.events.push_back(event);
        }
    }

    fn take_event(&mut self, pred: impl Fn(&TurnEvent) -> bool) -> Option<TurnEvent> {
        let idx = self.events.iter().position(pred)?;
        self.events.remove(idx)
    }

    fn handle_datagram(&mut self, n: usize, from: SocketAddr) {
        if from != self.server {
            eprintln!("dropping {n} bytes from unexpected source {from}");
            return;
        }
        let data = self.buf[..n].to_vec();
        if let Some(seen) = inspect(&data) {
            self.received.push(seen);
        } else if is_channel_data(&data) {
            self.channel_data_received += 1;
        }
        let now = self.now();
        let transmit = Transmit::new(data.as_slice(), TransportType::Udp, from, self.local);
        match self.client.recv(transmit, now) {
            TurnRecvRet::Handled => {}
            TurnRecvRet::Ignored(t) => {
                eprintln!("turn client ignored {} bytes: {:?}", t.data.len(), inspect(t.data))
            }
            TurnRecvRet::PeerData(pd) => self.peer_data.push_back((pd.peer, pd.data().to_vec())),
            TurnRecvRet::PeerIcmp { peer, icmp_type, icmp_code, .. } => {
                eprintln!("ICMP from {peer}: type {icmp_type} code {icmp_code}")
            }
        }
    }

    /// Send what is due, run timers, wait (<= max_wait, and no later than the
    /// client's next deadline) for one datagram from the server and feed it in.
    fn step(&mut self, max_wait: Duration) -> io::Result<()> {
        self.flush()?;
        self.drain_events();
        let now = self.now();
        let wait = match self.client.poll(now) {
            TurnPollRet::WaitUntil(deadline) => deadline.saturating_duration_since(now),
            TurnPollRet::Closed => {
                self.closed = true;
                self.drain_events();
                return Ok(());
            }
            other => panic!("unexpected poll result for a UDP TURN client: {other:?}"),
        };
        self.drain_events();
        self.flush()?;
        let wait = wait.clamp(Duration::from_millis(1), max_wait.max(Duration::from_millis(1)));
        self.socket.set_read_timeout(Some(wait))?;
        match self.socket.recv_from(&mut self.buf) {
            Ok((n, from)) => self.handle_datagram(n, from),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(e),
        }
        self.flush()?;
        self.drain_events();
        Ok(())
    }

    /// Drive the client until `f` yields, the client closes, or `timeout` passes.
    fn wait_for<R>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut(&mut Self) -> Option<R>,
    ) -> TestResult<R> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(r) = f(self) {
                return Ok(r);
            }
            if self.closed {
                return Err(format!(
                    "TURN client closed while waiting for {what}; events={:?} sent={:?} received={:?}",
                    self.events, self.sent, self.received
                ));
            }
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            if remaining.is_zero() {
                return Err(format!(
                    "timeout waiting for {what}; events={:?} sent={:?} received={:?}",
                    self.events, self.sent, self.received
                ));
            }
            self.step(remaining.min(Duration::from_millis(100))).map_err(|e| e.to_string())?;
        }
    }

    /// Wait for the allocation outcome: Ok(relayed) or Err(description).
    fn wait_allocation(&mut self, timeout: Duration) -> TestResult<SocketAddr> {
        let event = self.wait_for("allocation", timeout, |d| {
            d.take_event(|e| {
                matches!(e, TurnEvent::AllocationCreated(..) | TurnEvent::AllocationCreateFailed(_))
            })
        })?;
        match event {
            TurnEvent::AllocationCreated(TransportType::Udp, relayed) => Ok(relayed),
            other => Err(format!("allocation failed: {other:?}; received={:?}", self.received)),
        }
    }

    /// Send `payload` to `peer` via the relay; returns true iff it went as ChannelData.
    /// Panics if it went neither as ChannelData nor as a Send indication.
    fn send_to_peer(&mut self, peer: SocketAddr, payload: &[u8]) -> bool {
        let now = self.now();
        let tb = self
            .client
            .send_to(TransportType::Udp, peer, payload, now)
            .expect("send_to")
            .expect("UDP TURN client returned no transmit for send_to");
        let via_channel = match &tb.data {
            DelayedMessageOrChannelSend::Channel(_) => true,
            DelayedMessageOrChannelSend::Message(_) => false,
            other => panic!("send_to produced neither ChannelData nor a Send indication: {other:?}"),
        };
        let transmit = tb.build();
        assert_eq!(transmit.to, self.server);
        if !via_channel {
            let seen = inspect(&transmit.data).expect("Send indication must parse as STUN");
            assert_eq!(seen.class, MessageClass::Indication);
            assert_eq!(seen.method, turn_client_proto::types::message::SEND);
        } else {
            assert!(is_channel_data(&transmit.data));
        }
        self.socket.send_to(&transmit.data, transmit.to).unwrap();
        via_channel
    }

    fn count_received(&self, method: Method, class: MessageClass) -> usize {
        self.received.iter().filter(|s| s.method == method && s.class == class).count()
    }
}

/// Send `count` distinct payloads to the echo peer, one at a time, and check
/// each echo comes back from `peer` with identical bytes.
fn echo_round(d: &mut Driver, peer: SocketAddr, mode: &str, expect_channel: bool, count: usize) {
    for i in 0..count {
        let payload: Vec<u8> = format!("{mode} payload #{i:02} ")
            .into_bytes()
            .into_iter()
            .chain((0..(i * 37 % 500) as u32).map(|b| (b * 7 + i as u32) as u8))
            .collect();
        let via_channel = d.send_to_peer(peer, &payload);
        assert_eq!(via_channel, expect_channel, "{mode} #{i}: wrong framing chosen by the client");
        let (from, data) = d
            .wait_for(&format!("{mode} echo #{i}"), Duration::from_secs(3), |d| d.peer_data.pop_front())
            .unwrap();
        assert_eq!(from, peer, "{mode} #{i}: echo from unexpected peer");
        assert_eq!(data, payload, "{mode} #{i}: echoed payload differs");
    }
}

#[test]
fn relays_via_send_indication_and_channel() {
    const N: usize = 20;
    let turnd = common::Turnd::start("");
    let peer = common::EchoPeer::start();
    let (user, pass) = rest_credentials(unix_now() + 3600, common::SECRET);
    let mut d = Driver::new(turnd.addr, &user, &pass);

    let relayed = d
        .wait_allocation(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\nturnd log:\n{}", turnd.log()));
    eprintln!("allocated relay {relayed} (client {})", d.local);
    assert_eq!(relayed.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
    assert!(common::RELAY_PORTS.contains(&relayed.port()), "relay port {} out of range", relayed.port());
    assert!(d.client.relayed_addresses().any(|(t, a)| t == TransportType::Udp && a == relayed));
    assert!(
        d.received
            .iter()
            .any(|s| s.method == ALLOCATE && s.class == MessageClass::Error && s.error == Some(401)),
        "expected a 401 challenge first: {:?}",
        d.received
    );
    assert_eq!(d.count_received(ALLOCATE, MessageClass::Success), 1);

    // Permission for the peer IP.
    let now = d.now();
    d.client.create_permission(TransportType::Udp, peer.addr.ip(), now).unwrap();
    let event = d
        .wait_for("permission", Duration::from_secs(10), |d| {
            d.take_event(|e| {
                matches!(e, TurnEvent::PermissionCreated(_, ip) | TurnEvent::PermissionCreateFailed(_, ip)
                    if *ip == peer.addr.ip())
            })
        })
        .unwrap();
    assert!(matches!(event, TurnEvent::PermissionCreated(TransportType::Udp, _)), "{event:?}");
    assert!(d.client.have_permission(TransportType::Udp, peer.addr.ip()));

    // Send indications out, Data indications back.
    let data_ind_before = d.count_received(DATA, MessageClass::Indication);
    echo_round(&mut d, peer.addr, "send-indication", false, N);
    assert_eq!(d.count_received(DATA, MessageClass::Indication), data_ind_before + N);
    assert_eq!(d.channel_data_received, 0, "no channel bound yet, yet the server sent ChannelData");

    // Channel bind, then ChannelData both ways.
    let now = d.now();
    d.client.bind_channel(TransportType::Udp, peer.addr, now).unwrap();
    let event = d
        .wait_for("channel bind", Duration::from_secs(10), |d| {
            d.take_event(|e| {
                matches!(e, TurnEvent::ChannelCreated(_, a) | TurnEvent::ChannelCreateFailed(_, a)
                    if *a == peer.addr)
            })
        })
        .unwrap();
    assert!(matches!(event, TurnEvent::ChannelCreated(TransportType::Udp, _)), "{event:?}");

    let data_ind_before = d.count_received(DATA, MessageClass::Indication);
    echo_round(&mut d, peer.addr, "channel-data", true, N);
    assert_eq!(d.channel_data_received, N, "echoes over a bound channel must arrive as ChannelData");
    assert_eq!(
        d.count_received(DATA, MessageClass::Indication),
        data_ind_before,
        "server used Data indications despite a bound channel"
    );
    assert!(!d.closed);
    let echoed = peer.finish();
    assert_eq!(echoed, 2 * N as u64, "peer should have seen exactly the payloads sent");
}

/// Drive a client with bad credentials: it must never get an allocation, and
/// must give up in a bounded time (AllocationCreateFailed and/or Closed).
///
/// Note on timing: turnd's stateless NONCE embeds its expiry (unix_now + ttl),
/// so a 401 sent in a later wall-clock second carries a different NONCE.
/// stun-proto treats a 401 with the *same* realm+nonce as "wrong credentials"
/// (ignored, the transaction then times out) but a 401 with a *new* nonce as a
/// fresh challenge and resends (at most 8 times). With short transactions the
/// client gives up within ~1-2 s; with the RFC default schedule it takes ~9 s.
fn assert_refused(server: &common::Turnd, user: &str, pass: &str) {
    let started = std::time::Instant::now();
    let mut d = Driver::with_rto(server.addr, user, pass, SHORT_RTO);
    let outcome = d.wait_for("allocation failure", Duration::from_secs(15), |d| {
        if d.closed {
            return Some(None);
        }
        d.take_event(|e| {
            matches!(e, TurnEvent::AllocationCreated(..) | TurnEvent::AllocationCreateFailed(_))
        })
        .map(Some)
    });
    eprintln!(
        "refused after {:?}: outcome={outcome:?} sent={:?} received={:?} events={:?}",
        started.elapsed(),
        d.sent,
        d.received,
        d.events
    );
    let outcome = outcome.unwrap_or_else(|e| panic!("client neither failed nor closed: {e}"));
    assert!(
        !matches!(outcome, Some(TurnEvent::AllocationCreated(..))),
        "allocation must not succeed with these credentials: {outcome:?}"
    );
    // Let the client settle into Closed (bounded).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !d.closed && std::time::Instant::now() < deadline {
        d.step(Duration::from_millis(100)).unwrap();
    }
    assert!(d.closed, "client should have given up; received={:?}", d.received);
    assert!(!d.events.iter().any(|e| matches!(e, TurnEvent::AllocationCreated(..))));
    assert!(d.client.relayed_addresses().next().is_none());
    // On the wire: the server only ever answered ALLOCATE with 401s, including
    // to the authenticated request(s).
    let allocate_answers: Vec<_> = d.received.iter().filter(|s| s.method == ALLOCATE).collect();
    assert!(
        allocate_answers.iter().all(|s| s.class == MessageClass::Error && s.error == Some(401)),
        "{allocate_answers:?}"
    );
    assert!(d.sent.iter().filter(|s| s.method == ALLOCATE).count() >= 2, "{:?}", d.sent);
    assert!(allocate_answers.len() >= 2, "authenticated ALLOCATE got no answer: {:?}", d.received);
}

#[test]
fn wrong_secret_is_refused() {
    let turnd = common::Turnd::start("");
    let (user, pass) = rest_credentials(unix_now() + 3600, "not-the-server-secret");
    assert_refused(&turnd, &user, &pass);
}

#[test]
fn expired_credential_is_refused() {
    let turnd = common::Turnd::start("");
    let (user, pass) = rest_credentials(unix_now() - 60, common::SECRET);
    assert_refused(&turnd, &user, &pass);
}

#[test]
fn delete_frees_allocation() {
    let turnd = common::Turnd::start("");
    let (user, pass) = rest_credentials(unix_now() + 3600, common::SECRET);
    let mut d = Driver::new(turnd.addr, &user, &pass);
    let relayed = d
        .wait_allocation(Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e}\nturnd log:\n{}", turnd.log()));
    eprintln!("allocated relay {relayed}");

    let now = d.now();
    d.client.delete(now).unwrap();
    d.wait_for("allocation delete", Duration::from_secs(10), |d| d.closed.then_some(()))
        .unwrap();
    let refresh_answers: Vec<_> = d.received.iter().filter(|s| s.method == REFRESH).collect();
    assert!(
        refresh_answers.iter().any(|s| s.class == MessageClass::Success),
        "delete must be answered by a Refresh success: {refresh_answers:?}"
    );
    assert!(d.sent.iter().any(|s| s.method == REFRESH && s.lifetime == Some(0)), "{:?}", d.sent);
    assert!(d.client.relayed_addresses().next().is_none(), "relayed addresses remain after delete");

    // The server keeps working after the delete: a fresh client allocates again.
    let (user2, pass2) = rest_credentials(unix_now() + 3600, common::SECRET);
    let mut d2 = Driver::new(turnd.addr, &user2, &pass2);
    d2.wait_allocation(Duration::from_secs(10)).unwrap();
}
