//! The peer leg from outside the relay: does a datagram sent straight to a
//! relayed address, as a videobridge sends media, reach the client?

use super::*;

/// How many datagrams the peer leg sends at most (one every 250 ms within
/// the timeout; the first that arrives ends it).
const MAX_SENDS: u32 = 40;

/// Tests the peer leg with one of the `held` allocations (UDP preferred).
/// From a plain UDP socket of this machine: a Binding to the relay's UDP
/// listener gives its address as the relay sees it, the client installs a
/// permission for that address, and datagrams sent from the socket to the
/// relayed address must come out at the client as Data indications.
pub(super) fn peer_leg(held: &mut [Held], results: &[TransportResult], ip: IpAddr, o: &Options) -> PeerLeg {
    let Some(h) = held.iter().position(|h| h.transport == Transport::Udp).or(if held.is_empty() { None } else { Some(0) }) else {
        return PeerLeg::skipped("");
    };
    let h = &mut held[h];
    let to = h.alloc.relayed;
    let elsewhere = "run turnctl check on the videobridge host (or any machine whose UDP gets out) to test it";
    // Behind an HTTP proxy only TCP goes out (and through it).
    if o.proxy.is_some() {
        return PeerLeg { to: Some(to), ..PeerLeg::skipped(format!("not tested: UDP does not go through an HTTP proxy; {elsewhere}")) };
    }
    // UDP known not to get out from here: do not wait for it again.
    if let Some(u) = results.iter().find(|r| r.transport == Transport::Udp)
        && matches!(u.binding.failure(), Some(FailKind::Timeout | FailKind::Blocked | FailKind::Unreachable))
    {
        return PeerLeg { to: Some(to), ..PeerLeg::skipped(format!("UDP does not get out from here; {elsewhere}")) };
    }
    let listener = SocketAddr::new(ip, o.port);
    let sock = match UdpPeer::bind(to, o.timeout) {
        Ok(s) => s,
        Err(e) => return PeerLeg { to: Some(to), ..PeerLeg::skipped(format!("no UDP socket here ({e}); {elsewhere}")) },
    };
    let from = match sock.binding(listener) {
        Ok(a) => a,
        Err(e) => {
            let (_, d) = describe(&e, Transport::Udp, o.port);
            return PeerLeg {
                to: Some(to),
                ..PeerLeg::skipped(format!("no UDP Binding answer from {listener} ({d}), so UDP may not get out from here; {elsewhere}"))
            };
        }
    };
    let leg = |outcome| PeerLeg { outcome, from: Some(from), to: Some(to) };
    match h.client.create_permission(SocketAddr::new(from.ip(), 0)) {
        Ok(()) => {}
        Err(ClientError::Response { code: 403, reason }) => {
            return leg(Outcome::Skipped(format!(
                "the relay refuses this machine's address {} as a peer (403 {reason}: its peers.allow / peers.deny); {elsewhere}",
                from.ip()
            )));
        }
        Err(e) => {
            let (k, d) = describe(&e, h.transport, 0);
            return leg(Outcome::Failed(k, format!("CreatePermission for {}: {d}", from.ip())));
        }
    }
    let mut payload = *b"turnctl-check-peer-0123456789ab";
    let mut r = [0u8; 12];
    getrandom::fill(&mut r).expect("the OS random generator is available");
    payload[19..].copy_from_slice(&r);
    let t0 = Instant::now();
    let deadline = t0 + o.timeout;
    for _ in 0..MAX_SENDS {
        if let Err(e) = sock.send_to(to, &payload) {
            let (k, d) = describe(&e, Transport::Udp, to.port());
            return leg(Outcome::Failed(k, format!("sending to {to}: {d}")));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let wait_until = Instant::now() + left.min(Duration::from_millis(250));
        loop {
            let left = wait_until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match h.client.recv_data(left) {
                Ok((_, d)) if d == payload => {
                    return leg(Outcome::Ok(format!("arrived as a Data indication after {}", fmt_ms(t0.elapsed()))));
                }
                Ok(_) | Err(ClientError::Timeout(_)) => {}
                Err(e) => {
                    let (k, d) = describe(&e, h.transport, 0);
                    return leg(Outcome::Failed(k, format!("receiving: {d}")));
                }
            }
        }
        if Instant::now() >= deadline {
            break;
        }
    }
    leg(Outcome::Failed(
        FailKind::Timeout,
        format!("sent from {from} straight to the relayed address {to}; nothing arrived within {}", fmt_duration(o.timeout)),
    ))
}
