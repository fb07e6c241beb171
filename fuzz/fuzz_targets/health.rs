//! A leg's health bookkeeping on arbitrary relayed payloads: the input is
//! cut into packets (a length byte, a direction bit and a time step each),
//! fed to both legs. Besides "no panic": loss stays a ratio, received never
//! exceeds expected, the stream table stays bounded, and jitter and round
//! trips stay finite.

#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use turnd::turn::health::{classify, Health, MAX_STREAMS};

fuzz_target!(|data: &[u8]| {
    let mut h = Health::default();
    let t0 = Instant::now();
    let mut now = t0;
    let mut rest = data;
    while let [len, step, tail @ ..] = rest {
        let n = (*len as usize).min(tail.len());
        let (p, next) = tail.split_at(n);
        rest = next;
        now += Duration::from_micros((*step as u64 & 0x7f) * 500);
        let _ = classify(p);
        if step & 0x80 == 0 {
            h.from_client(p, now);
        } else {
            h.from_peer(p, now);
        }
    }
    for leg in [&h.client, &h.peer] {
        assert!(leg.streams().count() <= MAX_STREAMS);
        for s in leg.streams() {
            assert!(s.received <= s.expected + s.reordered, "{s:?}");
            assert!(s.jitter.is_none_or(f64::is_finite));
        }
        assert!(leg.loss().is_none_or(|l| (0.0..=1.0).contains(&l)));
        assert!(leg.rtt().is_none_or(|r| r <= now - t0));
    }
});
