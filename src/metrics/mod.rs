//! Prometheus metrics, rendered at scrape time from the core's counters and
//! the I/O layer's gauges (so they are live, and the hot path only adds to
//! plain integers). No label carries a username: ephemeral REST usernames
//! would grow the series without bound.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use crate::stun::method;
use crate::turn::health::{Histogram, JITTER_BOUNDS, LOSS_BOUNDS, RTT_BOUNDS};
use crate::turn::{EndReason, Stats, Transport};

/// Everything a scrape reports, gathered in one borrow of the shard.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub stats: Stats,
    /// Active allocations by (transport, family label).
    pub allocations: Vec<((Transport, &'static str), u64)>,
    /// Open TCP/TLS connections by transport.
    pub connections: [u64; 3],
    pub tls_handshake_failures: u64,
    pub connections_refused: u64,
    pub send_failures: u64,
    /// Media toward TCP/TLS clients dropped for being older than the stream's age bound.
    pub stale_media: u64,
    pub relay_ports_in_use: u64,
    pub relay_ports_total: u64,
    pub uptime_seconds: u64,
    pub draining: bool,
    /// Allocations and connections of each shard that answered, in shard order.
    pub shards: Vec<ShardCounts>,
    /// /readyz answers ready.
    pub ready: bool,
    /// The served TLS certificate's notAfter (unix seconds).
    pub cert_expiry: Option<i64>,
    /// ACME renewals (successes, failures), when turnd obtains its certificate.
    pub acme_renewals: Option<(u64, u64)>,
    /// Check page credential requests (issued, rate limited, wrong token), when it is on.
    pub check_credentials: Option<(u64, u64, u64)>,
    /// Shards that did not answer the scrape in time (stuck or stopped):
    /// their counts are missing from the sums.
    pub silent_shards: Vec<usize>,
}

/// What one shard holds (for `turnctl status`; metrics show the sums).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardCounts {
    pub index: usize,
    pub allocations: u64,
    pub connections: u64,
}

impl Snapshot {
    /// Adds the counts of another shard's snapshot to these.
    pub fn add(&mut self, o: &Snapshot) {
        self.stats.add(&o.stats);
        for (k, n) in &o.allocations {
            match self.allocations.iter_mut().find(|(kk, _)| kk == k) {
                Some((_, m)) => *m += n,
                None => self.allocations.push((*k, *n)),
            }
        }
        for (a, b) in self.connections.iter_mut().zip(o.connections) {
            *a += b;
        }
        self.tls_handshake_failures += o.tls_handshake_failures;
        self.connections_refused += o.connections_refused;
        self.send_failures += o.send_failures;
        self.stale_media += o.stale_media;
        self.shards.extend_from_slice(&o.shards);
    }
}

const AUTH_REASONS: [&str; 7] = ["challenge", "bad_request", "stale_nonce", "wrong_realm", "expired", "unknown_user", "bad_integrity"];

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

/// A histogram family with one series per leg (label `leg`: client, peer).
fn histogram_family(name: &str, help: &str, hists: &[Histogram<9>; 2], bounds: &[f64; 9]) -> prometheus::proto::MetricFamily {
    use prometheus::proto::{Bucket, LabelPair, Metric, MetricFamily, MetricType};
    let mut f = MetricFamily::default();
    f.set_name(name.to_owned());
    f.set_help(help.to_owned());
    f.set_field_type(MetricType::HISTOGRAM);
    for (leg, h) in ["client", "peer"].iter().zip(hists) {
        let mut label = LabelPair::default();
        label.set_name("leg".to_owned());
        label.set_value((*leg).to_owned());
        let mut cumulative = 0;
        let buckets = bounds
            .iter()
            .zip(h.buckets)
            .map(|(b, n)| {
                cumulative += n;
                let mut k = Bucket::default();
                k.set_upper_bound(*b);
                k.set_cumulative_count(cumulative);
                k
            })
            .collect();
        let mut ph = prometheus::proto::Histogram::default();
        ph.set_sample_count(h.count);
        ph.set_sample_sum(h.sum);
        ph.set_bucket(buckets);
        let mut m = Metric::default();
        m.set_label(vec![label]);
        m.set_histogram(ph);
        f.mut_metric().push(m);
    }
    f
}

/// The Prometheus text exposition of `s`.
pub fn render(s: &Snapshot) -> String {
    let r = Registry::new();
    let st = &s.stats;

    let info = gauge(&r, "turnd_build_info", "Build information; always 1.", &["version"]);
    info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
    gauge(&r, "turnd_uptime_seconds", "Seconds since start.", &[]).with_label_values(&[] as &[&str]).set(s.uptime_seconds as i64);
    gauge(&r, "turnd_shards", "Threads relaying, one shard each (the threads key).", &[])
        .with_label_values(&[] as &[&str])
        .set((s.shards.len() + s.silent_shards.len()) as i64);
    gauge(&r, "turnd_shards_not_answering", "Shards whose event loop did not answer this scrape in time (stuck or stopped).", &[])
        .with_label_values(&[] as &[&str])
        .set(s.silent_shards.len() as i64);
    gauge(&r, "turnd_draining", "1 while draining: after turnctl drain or SIGTERM (new allocations sent to a sibling relay or refused).", &[])
        .with_label_values(&[] as &[&str])
        .set(s.draining as i64);

    gauge(&r, "turnd_ready", "1 while /readyz answers ready (not draining, relay ports and descriptors left, a TLS certificate to serve).", &[])
        .with_label_values(&[] as &[&str])
        .set(s.ready as i64);
    if let Some(t) = s.cert_expiry {
        gauge(&r, "turnd_tls_certificate_expiry_timestamp_seconds", "When the served TLS certificate expires (notAfter, unix seconds).", &[])
            .with_label_values(&[] as &[&str])
            .set(t);
    }
    if let Some((ok, failed)) = s.acme_renewals {
        let c = counter(&r, "turnd_acme_renewals_total", "Attempts to obtain or renew the TLS certificate by ACME, by result.", &["result"]);
        c.with_label_values(&["success"]).inc_by(ok);
        c.with_label_values(&["failure"]).inc_by(failed);
    }
    if let Some((issued, limited, bad)) = s.check_credentials {
        let c = counter(&r, "turnd_check_credentials_total", "Check page credential requests, by result.", &["result"]);
        c.with_label_values(&["issued"]).inc_by(issued);
        c.with_label_values(&["rate_limited"]).inc_by(limited);
        c.with_label_values(&["bad_token"]).inc_by(bad);
        counter(&r, "turnd_check_allocations_total", "Allocations made with check page credentials.", &[])
            .with_label_values(&[] as &[&str])
            .inc_by(st.check_allocations_created);
    }
    let allocs = gauge(&r, "turnd_allocations", "Active allocations.", &["transport", "family"]);
    for t in Transport::ALL {
        for f in ["ipv4", "ipv6", "dual"] {
            let n = s.allocations.iter().find(|((tt, ff), _)| *tt == t && *ff == f).map_or(0, |(_, n)| *n);
            allocs.with_label_values(&[t.label(), f]).set(n as i64);
        }
    }
    counter(&r, "turnd_allocations_created_total", "Allocations created.", &[])
        .with_label_values(&[] as &[&str])
        .inc_by(st.allocations_created);
    let ended = counter(&r, "turnd_allocations_ended_total", "Allocations ended, by reason.", &["reason"]);
    for reason in EndReason::ALL {
        ended.with_label_values(&[reason.label()]).inc_by(st.allocations_ended[reason as usize]);
    }

    let packets = counter(&r, "turnd_relayed_packets_total", "Packets relayed.", &["direction", "transport"]);
    let bytes = counter(&r, "turnd_relayed_bytes_total", "Payload bytes relayed.", &["direction", "transport"]);
    for t in Transport::ALL {
        let (to, from) = (st.to_peer[t as usize], st.from_peer[t as usize]);
        packets.with_label_values(&["to_peer", t.label()]).inc_by(to.packets);
        packets.with_label_values(&["to_client", t.label()]).inc_by(from.packets);
        bytes.with_label_values(&["to_peer", t.label()]).inc_by(to.bytes);
        bytes.with_label_values(&["to_client", t.label()]).inc_by(from.bytes);
    }
    let fast = counter(&r, "turnd_fast_path_packets_total", "Of the relayed packets, those the XDP fast path relayed in the kernel.", &["direction"]);
    fast.with_label_values(&["to_peer"]).inc_by(st.fast_path[0].packets);
    fast.with_label_values(&["to_client"]).inc_by(st.fast_path[1].packets);

    let dropped = counter(&r, "turnd_dropped_packets_total", "Packets dropped, by reason.", &["reason"]);
    for (reason, n) in [
        ("malformed", st.dropped_malformed),
        ("no_allocation", st.dropped_no_allocation),
        ("no_permission", st.dropped_no_permission),
        ("no_channel", st.dropped_no_channel),
        ("unknown_attribute", st.dropped_unknown_attribute),
        ("rate_limited", st.dropped_rate_limited),
        ("amplification", st.dropped_amplification),
        ("allocation_bandwidth", st.dropped_allocation_bandwidth),
        ("total_bandwidth", st.dropped_total_bandwidth),
        ("send_failed", s.send_failures),
        ("stale", s.stale_media),
    ] {
        dropped.with_label_values(&[reason]).inc_by(n);
    }

    let responses = counter(&r, "turnd_responses_total", "Responses sent, by method and code (200 = success).", &["method", "code"]);
    for ((m, code), n) in &st.responses {
        responses.with_label_values(&[method::name(*m), &code.to_string()]).inc_by(*n);
    }
    let auth = counter(&r, "turnd_auth_failures_total", "Requests that failed authentication, by reason (challenge = the normal first 401).", &["reason"]);
    for (i, reason) in AUTH_REASONS.iter().enumerate() {
        auth.with_label_values(&[reason]).inc_by(st.auth_failures[i]);
    }
    counter(&r, "turnd_peer_refusals_total", "Requests refused by the peer policy (403).", &[])
        .with_label_values(&[] as &[&str])
        .inc_by(st.peer_refusals);
    let quota = counter(&r, "turnd_quota_refusals_total", "Requests refused by a quota or capacity limit.", &["kind"]);
    quota.with_label_values(&["quota"]).inc_by(st.quota_refusals);
    quota.with_label_values(&["capacity"]).inc_by(st.capacity_refusals);
    counter(&r, "turnd_allocations_redirected_total", "Allocate requests sent to a sibling relay while draining (300 Try Alternate).", &[])
        .with_label_values(&[] as &[&str])
        .inc_by(st.redirected);

    let conns = gauge(&r, "turnd_connections", "Open TCP/TLS client connections.", &["transport"]);
    for t in [Transport::Tcp, Transport::Tls] {
        conns.with_label_values(&[t.label()]).set(s.connections[t as usize] as i64);
    }
    counter(&r, "turnd_tls_handshake_failures_total", "TLS handshakes that failed or timed out.", &[])
        .with_label_values(&[] as &[&str])
        .inc_by(s.tls_handshake_failures);
    counter(&r, "turnd_connections_refused_total", "TCP/TLS connections refused by a connection limit.", &[])
        .with_label_values(&[] as &[&str])
        .inc_by(s.connections_refused);
    let ports = gauge(&r, "turnd_relay_ports", "Relay port pool.", &["state"]);
    ports.with_label_values(&["in_use"]).set(s.relay_ports_in_use as i64);
    ports.with_label_values(&["free"]).set(s.relay_ports_total.saturating_sub(s.relay_ports_in_use) as i64);

    let mut families = r.gather();
    let legs = &st.legs;
    for (name, help, hists, bounds) in [
        ("turnd_leg_loss_ratio", "Share of RTP packets lost on a leg before they reached the relay, per ended allocation (client: the participant's own link; peer: the link from the peer).", &legs.loss, &LOSS_BOUNDS),
        ("turnd_leg_jitter_seconds", "RTP interarrival jitter (RFC 3550) of a leg's audio stream (else its busiest stream), per ended allocation; streams whose clock rate could not be inferred are left out.", &legs.jitter, &JITTER_BOUNDS),
        ("turnd_leg_rtt_seconds", "Round trip between the relay and the client or the peer, from relayed ICE consent checks, per ended allocation.", &legs.rtt, &RTT_BOUNDS),
    ] {
        families.push(histogram_family(name, help, hists, bounds));
    }
    families.sort_by(|a, b| a.name().cmp(b.name()));
    let mut out = Vec::new();
    TextEncoder::new().encode(&families, &mut out).expect("text encoding cannot fail");
    String::from_utf8(out).expect("text exposition is UTF-8")
}
