//! Property tests: what holds for every input, not only the examples.
//! Codec round trips (messages, integrity, ChannelData, stream framing), the
//! peer policy over random addresses in every IPv4-in-IPv6 form, and the rule
//! that this host's addresses are reachable on relay ports only.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use turnd::stun::{attr, frame_len, method, ChannelData, Class, FrameLen, Message, MessageWriter};
use turnd::turn::policy::embedded_ipv4;
use turnd::turn::{Cidr, PeerPolicy};

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

/// The forms an IPv4 address can take inside an IPv6 address.
fn ipv6_forms(v4: Ipv4Addr) -> Vec<Ipv6Addr> {
    let o = v4.octets();
    let n = u32::from(v4);
    let inv = (!n).to_be_bytes();
    vec![
        v4.to_ipv6_mapped(),
        Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, (n >> 16) as u16, n as u16),
        Ipv6Addr::new(0x2002, u16::from_be_bytes([o[0], o[1]]), u16::from_be_bytes([o[2], o[3]]), 0, 0, 0, 0, 1),
        // Teredo with this address as the client (inverted in the last 32 bits), a public server.
        Ipv6Addr::new(0x2001, 0, 0x0808, 0x0808, 0, 0, u16::from_be_bytes([inv[0], inv[1]]), u16::from_be_bytes([inv[2], inv[3]])),
    ]
}

const RELAY_PORTS: (u16, u16) = (49152, 65535);

fn policy(own: &str) -> PeerPolicy {
    PeerPolicy::new(vec![], vec![], vec![own.parse().unwrap()], RELAY_PORTS)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn messages_round_trip(
        tid in any::<[u8; 12]>(),
        peers in proptest::collection::vec(socket_addr(), 0..40),
        data in proptest::collection::vec(any::<u8>(), 0..1500),
        lifetime in any::<u32>(),
        key in proptest::collection::vec(any::<u8>(), 1..64),
        sha256 in any::<bool>(),
    ) {
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(&mut buf, method::CREATE_PERMISSION, Class::Request, &tid);
        for p in &peers {
            w.xor_address(attr::XOR_PEER_ADDRESS, *p);
        }
        w.u32(attr::LIFETIME, lifetime).attr(attr::DATA, &data);
        if sha256 { w.integrity_sha256(&key); } else { w.integrity(&key); }
        w.fingerprint();
        let n = w.finish().unwrap();
        let m = Message::parse(&buf[..n]).unwrap();
        prop_assert_eq!((m.method(), m.class(), m.transaction_id()), (method::CREATE_PERMISSION, Class::Request, &tid));
        let got: Vec<SocketAddr> = m.get_all(attr::XOR_PEER_ADDRESS).map(|v| attr::decode_xor_address(v, &tid).unwrap()).collect();
        prop_assert_eq!(got, peers);
        prop_assert_eq!(m.get(attr::DATA), Some(&data[..]));
        prop_assert_eq!(m.get(attr::LIFETIME).map(|v| u32::from_be_bytes(v.try_into().unwrap())), Some(lifetime));
        prop_assert!(m.verify(&key));
        let mut other = key.clone();
        other[0] ^= 1;
        prop_assert!(!m.verify(&other));
        // Any single flipped bit in the signed part breaks integrity or parsing.
        let at = 20 + (lifetime as usize % (n - 20 - 8));
        let mut bad = buf[..n].to_vec();
        bad[at] ^= 1 << (lifetime % 8);
        prop_assert!(Message::parse(&bad).map(|m| !m.verify(&key)).unwrap_or(true));
    }

    #[test]
    fn channel_data_round_trips_and_frames(channel in 0x4000u16..=0x4FFF, data in proptest::collection::vec(any::<u8>(), 0..2000), pad in any::<bool>()) {
        let mut b = ChannelData::header(channel, data.len()).to_vec();
        b.extend_from_slice(&data);
        let unpadded = b.len();
        if pad {
            b.resize((b.len() + 3) & !3, 0);
        }
        let cd = ChannelData::parse(&b).unwrap();
        prop_assert_eq!((cd.channel, cd.data), (channel, &data[..]));
        // On a stream a ChannelData frame always takes its padded length.
        b.resize((unpadded + 3) & !3, 0);
        b.extend_from_slice(&[0x40, 0x00]);
        prop_assert_eq!(frame_len(&b), FrameLen::Complete((unpadded + 3) & !3));
    }

    #[test]
    fn every_ipv4_form_is_judged_as_the_ipv4_address(v4 in any::<[u8; 4]>()) {
        let v4 = Ipv4Addr::from(v4);
        let p = policy("203.0.113.10");
        let verdict = p.permits_ip(IpAddr::V4(v4));
        for v6 in ipv6_forms(v4) {
            prop_assert!(embedded_ipv4(v6).contains(&Some(v4)), "{v6} carries {v4}");
            // Teredo also carries its server (8.8.8.8, public): the address is refused if either is.
            prop_assert_eq!(p.permits_ip(IpAddr::V6(v6)), verdict, "{} as {}", v4, v6);
        }
    }

    #[test]
    fn private_ranges_are_refused_in_every_form(host in any::<u32>(), range in 0usize..5) {
        let (net, bits) = [("10.0.0.0", 8), ("172.16.0.0", 12), ("192.168.0.0", 16), ("127.0.0.0", 8), ("169.254.0.0", 16)][range];
        let base = u32::from(net.parse::<Ipv4Addr>().unwrap());
        let v4 = Ipv4Addr::from(base | (host >> bits));
        let p = policy("203.0.113.10");
        prop_assert!(!p.permits(SocketAddr::new(IpAddr::V4(v4), 50_000)), "{v4}");
        for v6 in ipv6_forms(v4) {
            prop_assert!(!p.permits(SocketAddr::new(IpAddr::V6(v6), 50_000)), "{v4} as {v6}");
        }
        // Allowing the range opens it.
        let allowed = PeerPolicy::new(vec![format!("{net}/{bits}").parse::<Cidr>().unwrap()], vec![], vec![], RELAY_PORTS);
        prop_assert!(allowed.permits_ip(IpAddr::V4(v4)));
    }

    #[test]
    fn this_host_is_reachable_on_relay_ports_only(port in any::<u16>(), form in 0usize..5) {
        let own: Ipv4Addr = "203.0.113.10".parse().unwrap();
        let p = policy("203.0.113.10");
        let ip = if form == 0 { IpAddr::V4(own) } else { IpAddr::V6(ipv6_forms(own)[form - 1]) };
        let relay = (RELAY_PORTS.0..=RELAY_PORTS.1).contains(&port);
        prop_assert_eq!(p.permits_port(SocketAddr::new(ip, port)), relay, "{}", SocketAddr::new(ip, port));
        // Another public address: any port.
        prop_assert!(p.permits(SocketAddr::new(IpAddr::V4(Ipv4Addr::new(8, 8, 4, 4)), port)));
    }
}
