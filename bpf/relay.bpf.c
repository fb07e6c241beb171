// SPDX-License-Identifier: (MIT OR Apache-2.0)
// turnd's XDP fast path (feature `xdp`, see src/net/xdp/mod.rs).
//
// UDP over IPv4 and IPv6. A ChannelData message from a client, to a listener, on a
// channel turnd mirrored into `chan4` leaves as a UDP datagram from the
// allocation's relayed address to the peer; a datagram from a peer to a
// relayed address whose channel is in `peer4` (`chan6`, `peer6` over IPv6) leaves as ChannelData to the
// client. Every check comes before the first write, so anything else (STUN,
// Send/Data indications, fragments, IP options, padded ChannelData, unknown
// or expired channels, no route or neighbour yet, a datagram that would not
// fit the egress MTU) passes to the socket path untouched.
//
// Bandwidth caps are held here too, as turnd holds them: a packet over its
// allocation's cap or the relay's total is dropped and counted (`buckets`).
//
// Packets are classified by destination, never by payload: each map key
// holds the destination address and port, so a peer's payload that happens
// to start like ChannelData misses `chan4` and is looked up in `peer4`.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/in.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define MAX_STATS 65536

// Every address and port in network byte order.
struct chan4_key {
	__u32 client_ip;
	__u32 listen_ip;
	__u16 client_port;
	__u16 listen_port;
	__u16 channel; // network order, as on the wire
	__u16 pad;
};

struct chan4_val {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
	__u32 stat; // index in `stats`
	__u32 bucket; // index in `buckets` of the allocation's cap (none: out of range)
	__u32 pad;
	__u64 expires_ns; // CLOCK_MONOTONIC
};

struct peer4_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
};

struct peer4_val {
	__u32 client_ip;
	__u32 listen_ip;
	__u16 client_port;
	__u16 listen_port;
	__u16 channel; // network order
	__u16 pad;
	__u32 stat;
	__u32 bucket;
	__u64 expires_ns;
};

// Per channel binding, summed over CPUs by turnd. Bytes are relayed payload
// bytes (without the ChannelData header), as the socket path counts them;
// drops are packets over the allocation's cap or the relay's total.
struct stat {
	__u64 to_peer_packets;
	__u64 to_peer_bytes;
	__u64 from_peer_packets;
	__u64 from_peer_bytes;
	__u64 dropped_allocation;
	__u64 dropped_total;
};

// A bandwidth cap: a token bucket per direction (0 to the peer, 1 from it),
// in byte-nanoseconds as turnd's own (src/turn/bandwidth.rs): it holds one
// second's worth, refills at `rate` bytes per second, and a packet costs
// what it takes on the wire. Entry 0 is the relay's total; the others are
// allocations', shared by all their channels. rate 0: no cap.
struct bucket {
	struct bpf_spin_lock lock;
	__u32 pad;
	__u64 rate;
	__u64 level[2];
	__u64 last[2];
};

// The same over IPv6.
struct chan6_key {
	__u32 client_ip[4];
	__u32 listen_ip[4];
	__u16 client_port;
	__u16 listen_port;
	__u16 channel;
	__u16 pad;
};

struct chan6_val {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
	__u32 stat;
	__u32 bucket;
	__u32 pad;
	__u64 expires_ns;
};

struct peer6_key {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
};

struct peer6_val {
	__u32 client_ip[4];
	__u32 listen_ip[4];
	__u16 client_port;
	__u16 listen_port;
	__u16 channel;
	__u16 pad;
	__u32 stat;
	__u32 bucket;
	__u64 expires_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan6_key);
	__type(value, struct chan6_val);
} chan6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer6_key);
	__type(value, struct peer6_val);
} peer6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan4_key);
	__type(value, struct chan4_val);
} chan4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer4_key);
	__type(value, struct peer4_val);
} peer4 SEC(".maps");

// Across families: a client over IPv4 whose peer is over IPv6 (its channel
// in `chan4x6`, the peer's datagrams in `peer6x4`), and the other way round.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan4_key);
	__type(value, struct chan6_val);
} chan4x6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer6_key);
	__type(value, struct peer4_val);
} peer6x4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan6_key);
	__type(value, struct chan4_val);
} chan6x4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer4_key);
	__type(value, struct peer6_val);
} peer4x6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MAX_STATS);
	__type(key, __u32);
	__type(value, struct stat);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_STATS + 1);
	__type(key, __u32);
	__type(value, struct bucket);
} buckets SEC(".maps");

#define NANOS 1000000000ULL
#define TO_PEER 0
#define FROM_PEER 1
// What turnd charges a payload for its headers on the wire: IP and UDP on
// the peer's leg, the ChannelData header on the client's.
#define FRAMING4 (28 + 4)
#define FRAMING6 (48 + 4)

// Takes `cost` bytes from direction `dir` of bucket `b`; 0 when over.
static __always_inline int take(struct bucket *b, const int dir, __u64 cost, __u64 now)
{
	int ok = 1;
	// No cap: no lock (shared by every CPU) either. The rate changes only on
	// a reload, so reading it unlocked sees the old or the new one.
	if (!b->rate)
		return 1;
	bpf_spin_lock(&b->lock);
	__u64 rate = b->rate;
	if (rate) {
		__u64 cap = rate * NANOS;
		__u64 elapsed = now - b->last[dir];
		if (elapsed > NANOS || now < b->last[dir])
			elapsed = NANOS;
		__u64 level = b->level[dir] + rate * elapsed;
		if (level < b->level[dir] || level > cap)
			level = cap;
		b->last[dir] = now;
		cost *= NANOS;
		if (level >= cost)
			level -= cost;
		else
			ok = 0;
		b->level[dir] = level;
	}
	bpf_spin_unlock(&b->lock);
	return ok;
}

// Whether a packet costing `cost` wire bytes in direction `dir` is within the
// allocation's cap (bucket `idx`) and the relay's total; a drop is counted
// in `s` by the cap that stopped it.
static __always_inline int within_caps(__u32 idx, const int dir, __u64 cost, __u64 now, struct stat *s)
{
	struct bucket *b = bpf_map_lookup_elem(&buckets, &idx);
	if (b && idx && !take(b, dir, cost, now)) {
		if (s)
			s->dropped_allocation++;
		return 0;
	}
	__u32 total = 0;
	b = bpf_map_lookup_elem(&buckets, &total);
	if (b && !take(b, dir, cost, now)) {
		if (s)
			s->dropped_total++;
		return 0;
	}
	return 1;
}

// One's complement sum helpers. Words are taken as they lie in memory; the
// sum is byte-order independent as long as it is stored back the same way.
static __always_inline __u32 add16(__u32 sum, __u16 w) { return sum + w; }
static __always_inline __u32 sub16(__u32 sum, __u16 w) { return sum + (__u16)~w; }
static __always_inline __u32 add32(__u32 sum, __u32 w) { return add16(add16(sum, w & 0xffff), w >> 16); }
static __always_inline __u32 sub32(__u32 sum, __u32 w) { return sub16(sub16(sum, w & 0xffff), w >> 16); }
static __always_inline __u32 add128(__u32 sum, const __u32 *w)
{
	for (int i = 0; i < 4; i++)
		sum = add32(sum, w[i]);
	return sum;
}
static __always_inline __u32 sub128(__u32 sum, const __u32 *w)
{
	for (int i = 0; i < 4; i++)
		sum = sub32(sum, w[i]);
	return sum;
}
static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;
	ip->check = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return ~fold(sum);
}

// Finds the next hop for a datagram of `tot_len` IP bytes from src to dst.
// Anything but success (no route, no neighbour yet, forwarding off on the
// ingress interface, over the MTU) leaves the packet to the socket path.
// With a zero `src` (a client of a wildcard listener), the lookup derives
// the source address too (BPF_FIB_LOOKUP_SRC, kernel 6.7 and later): the one
// the kernel would send a reply from, as turnd's wildcard socket does.
static __always_inline int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib, __u32 src, __u32 dst, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	fib->ipv4_src = src;
	fib->ipv4_dst = dst;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), src ? 0 : BPF_FIB_LOOKUP_SRC);
}

static __always_inline int send(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

static __always_inline void write_headers(struct ethhdr *eth, struct iphdr *ip, struct udphdr *udp, const struct iphdr *old_ip,
					  struct bpf_fib_lookup *fib, __u32 src, __u32 dst, __u16 sport, __u16 dport, __u16 ulen, __u16 csum)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);
	__builtin_memcpy(ip, old_ip, sizeof(*ip));
	ip->tot_len = bpf_htons(ulen + sizeof(struct iphdr));
	ip->ttl = 64;
	ip->saddr = src;
	ip->daddr = dst;
	ip->check = ip_checksum(ip);
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(ulen);
	udp->check = csum;
}

static __always_inline int route6(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const __u32 *src, const __u32 *dst, __u16 tot_len);
static __always_inline int to_peer_4to6(struct xdp_md *ctx, struct iphdr *ip, struct udphdr *udp, __u8 *pl, __u16 ulen, struct chan6_val *v, __u64 now);
static __always_inline int to_client_4to6(struct xdp_md *ctx, struct iphdr *ip, struct udphdr *udp, __u16 ulen, struct peer6_val *pv, __u64 now);

static __always_inline int relay4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	__u8 *pl = (void *)udp + sizeof(*udp);

	if ((void *)pl > end)
		return XDP_PASS;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	// No options, no fragments, UDP, and lengths that agree with the frame.
	if (ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(0x3fff)) || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < 8 || tot_len != ulen + sizeof(struct iphdr) || (void *)ip + tot_len > end)
		return XDP_PASS;
	__u16 plen = ulen - 8;
	__u64 now = bpf_ktime_get_ns();
	struct bpf_fib_lookup fib;
	struct iphdr old_ip;
	__u32 sum;

	// A client's ChannelData to a listener: channel numbers are 0x4000-0x7FFF.
	if (plen >= 4 && (void *)(pl + 4) <= end && (pl[0] & 0xC0) == 0x40) {
		struct chan4_key k = {
			.client_ip = ip->saddr,
			.listen_ip = ip->daddr,
			.client_port = udp->source,
			.listen_port = udp->dest,
			.channel = *(__u16 *)pl,
		};
		struct chan4_val *v = bpf_map_lookup_elem(&chan4, &k);
		if (!v) {
			// A client of a wildcard listener: keyed with a zero address.
			k.listen_ip = 0;
			v = bpf_map_lookup_elem(&chan4, &k);
		}
		if (!v) {
			// Its peer over IPv6.
			k.listen_ip = ip->daddr;
			struct chan6_val *x = bpf_map_lookup_elem(&chan4x6, &k);
			if (!x) {
				k.listen_ip = 0;
				x = bpf_map_lookup_elem(&chan4x6, &k);
			}
			if (x)
				return to_peer_4to6(ctx, ip, udp, pl, ulen, x, now);
		}
		if (v) {
			__u16 cd_len = ((__u16)pl[2] << 8) | pl[3];
			// Exactly the message: padded ChannelData goes the socket way.
			if (now >= v->expires_ns || cd_len + 4 != plen)
				return XDP_PASS;
			__u16 new_ulen = ulen - 4;
			if (route(ctx, &fib, v->relay_ip, v->peer_ip, new_ulen + sizeof(struct iphdr)) != BPF_FIB_LKUP_RET_SUCCESS)
				return XDP_PASS;
			__u16 csum = udp->check;
			if (csum) {
				// The payload after the 4-byte header keeps its alignment, so
				// its sum is unchanged: swap addresses, ports, lengths (in
				// the pseudo-header and the UDP header) and drop the header.
				sum = (__u16)~csum;
				sum = sub32(sum, ip->saddr);
				sum = sub32(sum, ip->daddr);
				sum = sub16(sum, udp->source);
				sum = sub16(sum, udp->dest);
				sum = sub16(sum, udp->len);
				sum = sub16(sum, udp->len);
				sum = sub16(sum, *(__u16 *)pl);
				sum = sub16(sum, *(__u16 *)(pl + 2));
				sum = add32(sum, v->relay_ip);
				sum = add32(sum, v->peer_ip);
				sum = add16(sum, v->relay_port);
				sum = add16(sum, v->peer_port);
				sum = add16(sum, bpf_htons(new_ulen));
				sum = add16(sum, bpf_htons(new_ulen));
				csum = ~fold(sum);
				if (!csum)
					csum = 0xffff;
			}
			__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip, idx = v->stat, bucket = v->bucket;
			__u16 relay_port = v->relay_port, peer_port = v->peer_port;
			struct stat *s = bpf_map_lookup_elem(&stats, &idx);
			if (!within_caps(bucket, TO_PEER, cd_len + FRAMING4, now, s))
				return XDP_DROP;
			__builtin_memcpy(&old_ip, ip, sizeof(old_ip));
			if (bpf_xdp_adjust_head(ctx, 4))
				return XDP_PASS;
			data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			eth = data;
			ip = data + sizeof(*eth);
			udp = (void *)ip + sizeof(*ip);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			write_headers(eth, ip, udp, &old_ip, &fib, relay_ip, peer_ip, relay_port, peer_port, new_ulen, csum);
			if (s) {
				s->to_peer_packets++;
				s->to_peer_bytes += cd_len;
			}
			return send(ctx, &fib);
		}
	}

	// A peer's datagram to a relayed address with a bound channel.
	struct peer4_key pk = {
		.relay_ip = ip->daddr,
		.peer_ip = ip->saddr,
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	struct peer4_val *pv = bpf_map_lookup_elem(&peer4, &pk);
	if (!pv) {
		// Its client over IPv6.
		struct peer6_val *x = bpf_map_lookup_elem(&peer4x6, &pk);
		return x ? to_client_4to6(ctx, ip, udp, ulen, x, now) : XDP_PASS;
	}
	if (now >= pv->expires_ns || plen > 0xffff - 4)
		return XDP_PASS;
	__u16 new_ulen = ulen + 4;
	if (route(ctx, &fib, pv->listen_ip, pv->client_ip, new_ulen + sizeof(struct iphdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	// The listener's address, or for a wildcard listener the one the route derived.
	__u32 listen_ip = pv->listen_ip ? pv->listen_ip : fib.ipv4_src;
	__u16 cd_len = bpf_htons(plen);
	__u16 csum = udp->check;
	if (csum) {
		// The payload moves 4 bytes on, keeping its alignment and its sum.
		sum = (__u16)~csum;
		sum = sub32(sum, ip->saddr);
		sum = sub32(sum, ip->daddr);
		sum = sub16(sum, udp->source);
		sum = sub16(sum, udp->dest);
		sum = sub16(sum, udp->len);
		sum = sub16(sum, udp->len);
		sum = add32(sum, listen_ip);
		sum = add32(sum, pv->client_ip);
		sum = add16(sum, pv->listen_port);
		sum = add16(sum, pv->client_port);
		sum = add16(sum, bpf_htons(new_ulen));
		sum = add16(sum, bpf_htons(new_ulen));
		sum = add16(sum, pv->channel);
		sum = add16(sum, cd_len);
		csum = ~fold(sum);
		if (!csum)
			csum = 0xffff;
	}
	__u32 client_ip = pv->client_ip, idx = pv->stat, bucket = pv->bucket;
	__u16 listen_port = pv->listen_port, client_port = pv->client_port, channel = pv->channel;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, FROM_PEER, plen + FRAMING4, now, s))
		return XDP_DROP;
	__builtin_memcpy(&old_ip, ip, sizeof(old_ip));
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + sizeof(*eth);
	udp = (void *)ip + sizeof(*ip);
	pl = (void *)udp + sizeof(*udp);
	if ((void *)(pl + 4) > end)
		return XDP_DROP;
	write_headers(eth, ip, udp, &old_ip, &fib, listen_ip, client_ip, listen_port, client_port, new_ulen, csum);
	*(__u16 *)pl = channel;
	*(__u16 *)(pl + 2) = cd_len;
	if (s) {
		s->from_peer_packets++;
		s->from_peer_bytes += plen;
	}
	return send(ctx, &fib);
}


static __always_inline int route6(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const __u32 *src, const __u32 *dst, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = AF_INET6;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	__builtin_memcpy(fib->ipv6_src, src, 16);
	__builtin_memcpy(fib->ipv6_dst, dst, 16);
	fib->ifindex = ctx->ingress_ifindex;
	int wildcard = !(src[0] | src[1] | src[2] | src[3]);
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), wildcard ? BPF_FIB_LOOKUP_SRC : 0);
}

static __always_inline void write_headers6(struct ethhdr *eth, struct ipv6hdr *ip, struct udphdr *udp, const struct ipv6hdr *old_ip,
					   struct bpf_fib_lookup *fib, const __u32 *src, const __u32 *dst, __u16 sport, __u16 dport, __u16 ulen,
					   __u16 csum)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);
	__builtin_memcpy(ip, old_ip, sizeof(*ip));
	ip->payload_len = bpf_htons(ulen);
	ip->hop_limit = 64;
	__builtin_memcpy(&ip->saddr, src, 16);
	__builtin_memcpy(&ip->daddr, dst, 16);
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(ulen);
	udp->check = csum;
}

// Across families. The payload moves by 16 or 24 bytes, an even count, so
// its share of the UDP checksum stays; the new headers are written whole.

static __always_inline void ip4_header(struct iphdr *ip, __u32 src, __u32 dst, __u16 ulen)
{
	*(__u16 *)ip = bpf_htons(0x4500); // version 4, 5 words, no TOS
	ip->tot_len = bpf_htons(ulen + sizeof(struct iphdr));
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); // don't fragment, as turnd's sockets send
	ip->ttl = 64;
	ip->protocol = IPPROTO_UDP;
	ip->saddr = src;
	ip->daddr = dst;
	ip->check = ip_checksum(ip);
}

static __always_inline void ip6_header(struct ipv6hdr *ip, const __u32 *src, const __u32 *dst, __u16 ulen)
{
	*(__u32 *)ip = bpf_htonl(0x60000000); // version 6, no traffic class or flow label
	ip->payload_len = bpf_htons(ulen);
	ip->nexthdr = IPPROTO_UDP;
	ip->hop_limit = 64;
	__builtin_memcpy(&ip->saddr, src, 16);
	__builtin_memcpy(&ip->daddr, dst, 16);
}

static __always_inline void udp_header(struct udphdr *udp, __u16 sport, __u16 dport, __u16 ulen, __u16 csum)
{
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(ulen);
	udp->check = csum;
}

static __always_inline void eth_header(struct ethhdr *eth, struct bpf_fib_lookup *fib, __u16 proto)
{
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	eth->h_proto = bpf_htons(proto);
}

// A client's ChannelData over IPv4 to its peer over IPv6.
static __always_inline int to_peer_4to6(struct xdp_md *ctx, struct iphdr *ip, struct udphdr *udp, __u8 *pl, __u16 ulen, struct chan6_val *v, __u64 now)
{
	__u16 plen = ulen - 8;
	__u16 cd_len = ((__u16)pl[2] << 8) | pl[3];
	// IPv6 needs a checksum, and one absent over IPv4 cannot be updated.
	if (now >= v->expires_ns || cd_len + 4 != plen || !udp->check)
		return XDP_PASS;
	__u16 new_ulen = ulen - 4;
	struct bpf_fib_lookup fib;
	if (route6(ctx, &fib, v->relay_ip, v->peer_ip, new_ulen + sizeof(struct ipv6hdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 sum = (__u16)~udp->check;
	sum = sub32(sum, ip->saddr);
	sum = sub32(sum, ip->daddr);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, *(__u16 *)pl);
	sum = sub16(sum, *(__u16 *)(pl + 2));
	sum = add128(sum, v->relay_ip);
	sum = add128(sum, v->peer_ip);
	sum = add16(sum, v->relay_port);
	sum = add16(sum, v->peer_port);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	__u16 csum = ~fold(sum);
	if (!csum)
		csum = 0xffff;
	__u32 relay_ip[4], peer_ip[4];
	__builtin_memcpy(relay_ip, v->relay_ip, 16);
	__builtin_memcpy(peer_ip, v->peer_ip, 16);
	__u32 idx = v->stat, bucket = v->bucket;
	__u16 relay_port = v->relay_port, peer_port = v->peer_port;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, TO_PEER, cd_len + FRAMING6, now, s))
		return XDP_DROP;
	// IPv4 20 + UDP 8 + ChannelData 4 in front of the payload become IPv6 40 + UDP 8.
	if (bpf_xdp_adjust_head(ctx, -16))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	struct udphdr *u = (void *)(ip6 + 1);
	if ((void *)(u + 1) > end)
		return XDP_DROP;
	eth_header(eth, &fib, ETH_P_IPV6);
	ip6_header(ip6, relay_ip, peer_ip, new_ulen);
	udp_header(u, relay_port, peer_port, new_ulen, csum);
	if (s) {
		s->to_peer_packets++;
		s->to_peer_bytes += cd_len;
	}
	return send(ctx, &fib);
}

// A peer's datagram over IPv6 to its client over IPv4, as ChannelData.
static __always_inline int to_client_6to4(struct xdp_md *ctx, struct ipv6hdr *ip, struct udphdr *udp, __u16 ulen, struct peer4_val *pv, __u64 now)
{
	__u16 plen = ulen - 8;
	if (now >= pv->expires_ns || plen > 0xffff - 8 - 4)
		return XDP_PASS;
	__u16 new_ulen = ulen + 4;
	struct bpf_fib_lookup fib;
	if (route(ctx, &fib, pv->listen_ip, pv->client_ip, new_ulen + sizeof(struct iphdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 listen_ip = pv->listen_ip ? pv->listen_ip : fib.ipv4_src;
	__u16 cd_len = bpf_htons(plen);
	__u32 sum = (__u16)~udp->check;
	sum = sub128(sum, (__u32 *)&ip->saddr);
	sum = sub128(sum, (__u32 *)&ip->daddr);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, udp->len);
	sum = add32(sum, listen_ip);
	sum = add32(sum, pv->client_ip);
	sum = add16(sum, pv->listen_port);
	sum = add16(sum, pv->client_port);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, pv->channel);
	sum = add16(sum, cd_len);
	__u16 csum = ~fold(sum);
	if (!csum)
		csum = 0xffff;
	__u32 client_ip = pv->client_ip, idx = pv->stat, bucket = pv->bucket;
	__u16 listen_port = pv->listen_port, client_port = pv->client_port, channel = pv->channel;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, FROM_PEER, plen + FRAMING6, now, s))
		return XDP_DROP;
	// IPv6 40 + UDP 8 become IPv4 20 + UDP 8 + ChannelData 4.
	if (bpf_xdp_adjust_head(ctx, 16))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	struct udphdr *u = (void *)(ip4 + 1);
	__u8 *pl = (void *)(u + 1);
	if ((void *)(pl + 4) > end)
		return XDP_DROP;
	eth_header(eth, &fib, ETH_P_IP);
	ip4_header(ip4, listen_ip, client_ip, new_ulen);
	udp_header(u, listen_port, client_port, new_ulen, csum);
	*(__u16 *)pl = channel;
	*(__u16 *)(pl + 2) = cd_len;
	if (s) {
		s->from_peer_packets++;
		s->from_peer_bytes += plen;
	}
	return send(ctx, &fib);
}

// A client's ChannelData over IPv6 to its peer over IPv4.
static __always_inline int to_peer_6to4(struct xdp_md *ctx, struct ipv6hdr *ip, struct udphdr *udp, __u8 *pl, __u16 ulen, struct chan4_val *v, __u64 now)
{
	__u16 plen = ulen - 8;
	__u16 cd_len = ((__u16)pl[2] << 8) | pl[3];
	if (now >= v->expires_ns || cd_len + 4 != plen)
		return XDP_PASS;
	__u16 new_ulen = ulen - 4;
	struct bpf_fib_lookup fib;
	if (route(ctx, &fib, v->relay_ip, v->peer_ip, new_ulen + sizeof(struct iphdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 sum = (__u16)~udp->check;
	sum = sub128(sum, (__u32 *)&ip->saddr);
	sum = sub128(sum, (__u32 *)&ip->daddr);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, *(__u16 *)pl);
	sum = sub16(sum, *(__u16 *)(pl + 2));
	sum = add32(sum, v->relay_ip);
	sum = add32(sum, v->peer_ip);
	sum = add16(sum, v->relay_port);
	sum = add16(sum, v->peer_port);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	__u16 csum = ~fold(sum);
	if (!csum)
		csum = 0xffff;
	__u32 relay_ip = v->relay_ip, peer_ip = v->peer_ip, idx = v->stat, bucket = v->bucket;
	__u16 relay_port = v->relay_port, peer_port = v->peer_port;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, TO_PEER, cd_len + FRAMING4, now, s))
		return XDP_DROP;
	// IPv6 40 + UDP 8 + ChannelData 4 become IPv4 20 + UDP 8.
	if (bpf_xdp_adjust_head(ctx, 24))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	struct udphdr *u = (void *)(ip4 + 1);
	if ((void *)(u + 1) > end)
		return XDP_DROP;
	eth_header(eth, &fib, ETH_P_IP);
	ip4_header(ip4, relay_ip, peer_ip, new_ulen);
	udp_header(u, relay_port, peer_port, new_ulen, csum);
	if (s) {
		s->to_peer_packets++;
		s->to_peer_bytes += cd_len;
	}
	return send(ctx, &fib);
}

// A peer's datagram over IPv4 to its client over IPv6, as ChannelData.
static __always_inline int to_client_4to6(struct xdp_md *ctx, struct iphdr *ip, struct udphdr *udp, __u16 ulen, struct peer6_val *pv, __u64 now)
{
	__u16 plen = ulen - 8;
	// IPv6 needs a checksum, and one absent over IPv4 cannot be updated.
	if (now >= pv->expires_ns || plen > 0xffff - 8 - 4 || !udp->check)
		return XDP_PASS;
	__u16 new_ulen = ulen + 4;
	struct bpf_fib_lookup fib;
	if (route6(ctx, &fib, pv->listen_ip, pv->client_ip, new_ulen + sizeof(struct ipv6hdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 listen_ip[4];
	if (pv->listen_ip[0] | pv->listen_ip[1] | pv->listen_ip[2] | pv->listen_ip[3])
		__builtin_memcpy(listen_ip, pv->listen_ip, 16);
	else
		__builtin_memcpy(listen_ip, fib.ipv6_src, 16);
	__u16 cd_len = bpf_htons(plen);
	__u32 sum = (__u16)~udp->check;
	sum = sub32(sum, ip->saddr);
	sum = sub32(sum, ip->daddr);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, udp->len);
	sum = add128(sum, listen_ip);
	sum = add128(sum, pv->client_ip);
	sum = add16(sum, pv->listen_port);
	sum = add16(sum, pv->client_port);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, pv->channel);
	sum = add16(sum, cd_len);
	__u16 csum = ~fold(sum);
	if (!csum)
		csum = 0xffff;
	__u32 client_ip[4];
	__builtin_memcpy(client_ip, pv->client_ip, 16);
	__u32 idx = pv->stat, bucket = pv->bucket;
	__u16 listen_port = pv->listen_port, client_port = pv->client_port, channel = pv->channel;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, FROM_PEER, plen + FRAMING4, now, s))
		return XDP_DROP;
	// IPv4 20 + UDP 8 become IPv6 40 + UDP 8 + ChannelData 4.
	if (bpf_xdp_adjust_head(ctx, -24))
		return XDP_PASS;
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	struct udphdr *u = (void *)(ip6 + 1);
	__u8 *pl = (void *)(u + 1);
	if ((void *)(pl + 4) > end)
		return XDP_DROP;
	eth_header(eth, &fib, ETH_P_IPV6);
	ip6_header(ip6, listen_ip, client_ip, new_ulen);
	udp_header(u, listen_port, client_port, new_ulen, csum);
	*(__u16 *)pl = channel;
	*(__u16 *)(pl + 2) = cd_len;
	if (s) {
		s->from_peer_packets++;
		s->from_peer_bytes += plen;
	}
	return send(ctx, &fib);
}

// IPv6: the same, without fragments or extension headers (the next header
// must be UDP), and never a zero UDP checksum (IPv6 requires one).
static __always_inline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip = data + sizeof(*eth);
	struct udphdr *udp = (void *)ip + sizeof(*ip);
	__u8 *pl = (void *)udp + sizeof(*udp);

	if ((void *)pl > end)
		return XDP_PASS;
	if (ip->nexthdr != IPPROTO_UDP || !udp->check)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < 8 || bpf_ntohs(ip->payload_len) != ulen || (void *)udp + ulen > end)
		return XDP_PASS;
	__u16 plen = ulen - 8;
	__u64 now = bpf_ktime_get_ns();
	struct bpf_fib_lookup fib;
	struct ipv6hdr old_ip;
	__u32 sum;

	if (plen >= 4 && (void *)(pl + 4) <= end && (pl[0] & 0xC0) == 0x40) {
		struct chan6_key k = {
			.client_port = udp->source,
			.listen_port = udp->dest,
			.channel = *(__u16 *)pl,
		};
		__builtin_memcpy(k.client_ip, &ip->saddr, 16);
		__builtin_memcpy(k.listen_ip, &ip->daddr, 16);
		struct chan6_val *v = bpf_map_lookup_elem(&chan6, &k);
		if (!v) {
			__builtin_memset(k.listen_ip, 0, 16);
			v = bpf_map_lookup_elem(&chan6, &k);
		}
		if (!v) {
			// Its peer over IPv4.
			__builtin_memcpy(k.listen_ip, &ip->daddr, 16);
			struct chan4_val *x = bpf_map_lookup_elem(&chan6x4, &k);
			if (!x) {
				__builtin_memset(k.listen_ip, 0, 16);
				x = bpf_map_lookup_elem(&chan6x4, &k);
			}
			if (x)
				return to_peer_6to4(ctx, ip, udp, pl, ulen, x, now);
		}
		if (v) {
			__u16 cd_len = ((__u16)pl[2] << 8) | pl[3];
			if (now >= v->expires_ns || cd_len + 4 != plen)
				return XDP_PASS;
			__u16 new_ulen = ulen - 4;
			if (route6(ctx, &fib, v->relay_ip, v->peer_ip, new_ulen + sizeof(struct ipv6hdr)) != BPF_FIB_LKUP_RET_SUCCESS)
				return XDP_PASS;
			sum = (__u16)~udp->check;
			sum = sub128(sum, (__u32 *)&ip->saddr);
			sum = sub128(sum, (__u32 *)&ip->daddr);
			sum = sub16(sum, udp->source);
			sum = sub16(sum, udp->dest);
			sum = sub16(sum, udp->len);
			sum = sub16(sum, udp->len);
			sum = sub16(sum, *(__u16 *)pl);
			sum = sub16(sum, *(__u16 *)(pl + 2));
			sum = add128(sum, v->relay_ip);
			sum = add128(sum, v->peer_ip);
			sum = add16(sum, v->relay_port);
			sum = add16(sum, v->peer_port);
			sum = add16(sum, bpf_htons(new_ulen));
			sum = add16(sum, bpf_htons(new_ulen));
			__u16 csum = ~fold(sum);
			if (!csum)
				csum = 0xffff;
			__u32 relay_ip[4], peer_ip[4];
			__builtin_memcpy(relay_ip, v->relay_ip, 16);
			__builtin_memcpy(peer_ip, v->peer_ip, 16);
			__u32 idx = v->stat, bucket = v->bucket;
			__u16 relay_port = v->relay_port, peer_port = v->peer_port;
			struct stat *s = bpf_map_lookup_elem(&stats, &idx);
			if (!within_caps(bucket, TO_PEER, cd_len + FRAMING6, now, s))
				return XDP_DROP;
			__builtin_memcpy(&old_ip, ip, sizeof(old_ip));
			if (bpf_xdp_adjust_head(ctx, 4))
				return XDP_PASS;
			data = (void *)(long)ctx->data;
			end = (void *)(long)ctx->data_end;
			eth = data;
			ip = data + sizeof(*eth);
			udp = (void *)ip + sizeof(*ip);
			if ((void *)(udp + 1) > end)
				return XDP_DROP;
			write_headers6(eth, ip, udp, &old_ip, &fib, relay_ip, peer_ip, relay_port, peer_port, new_ulen, csum);
			if (s) {
				s->to_peer_packets++;
				s->to_peer_bytes += cd_len;
			}
			return send(ctx, &fib);
		}
	}

	struct peer6_key pk = {
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	__builtin_memcpy(pk.relay_ip, &ip->daddr, 16);
	__builtin_memcpy(pk.peer_ip, &ip->saddr, 16);
	struct peer6_val *pv = bpf_map_lookup_elem(&peer6, &pk);
	if (!pv) {
		// Its client over IPv4.
		struct peer4_val *x = bpf_map_lookup_elem(&peer6x4, &pk);
		return x ? to_client_6to4(ctx, ip, udp, ulen, x, now) : XDP_PASS;
	}
	if (now >= pv->expires_ns || plen > 0xffff - 8 - 4)
		return XDP_PASS;
	__u16 new_ulen = ulen + 4;
	if (route6(ctx, &fib, pv->listen_ip, pv->client_ip, new_ulen + sizeof(struct ipv6hdr)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 listen_ip[4];
	if (pv->listen_ip[0] | pv->listen_ip[1] | pv->listen_ip[2] | pv->listen_ip[3])
		__builtin_memcpy(listen_ip, pv->listen_ip, 16);
	else
		__builtin_memcpy(listen_ip, fib.ipv6_src, 16);
	__u16 cd_len = bpf_htons(plen);
	sum = (__u16)~udp->check;
	sum = sub128(sum, (__u32 *)&ip->saddr);
	sum = sub128(sum, (__u32 *)&ip->daddr);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len);
	sum = sub16(sum, udp->len);
	sum = add128(sum, listen_ip);
	sum = add128(sum, pv->client_ip);
	sum = add16(sum, pv->listen_port);
	sum = add16(sum, pv->client_port);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, pv->channel);
	sum = add16(sum, cd_len);
	__u16 csum = ~fold(sum);
	if (!csum)
		csum = 0xffff;
	__u32 client_ip[4];
	__builtin_memcpy(client_ip, pv->client_ip, 16);
	__u32 idx = pv->stat, bucket = pv->bucket;
	__u16 listen_port = pv->listen_port, client_port = pv->client_port, channel = pv->channel;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, FROM_PEER, plen + FRAMING6, now, s))
		return XDP_DROP;
	__builtin_memcpy(&old_ip, ip, sizeof(old_ip));
	if (bpf_xdp_adjust_head(ctx, -4))
		return XDP_PASS;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	eth = data;
	ip = data + sizeof(*eth);
	udp = (void *)ip + sizeof(*ip);
	pl = (void *)udp + sizeof(*udp);
	if ((void *)(pl + 4) > end)
		return XDP_DROP;
	write_headers6(eth, ip, udp, &old_ip, &fib, listen_ip, client_ip, listen_port, client_port, new_ulen, csum);
	*(__u16 *)pl = channel;
	*(__u16 *)(pl + 2) = cd_len;
	if (s) {
		s->from_peer_packets++;
		s->from_peer_bytes += plen;
	}
	return send(ctx, &fib);
}

SEC("xdp")
int xdp_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return XDP_PASS;
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		return relay4(ctx);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return relay6(ctx);
	return XDP_PASS;
}

// Passes everything: for the far ends of veth pairs in tests (native XDP on
// veth delivers what the other end sends with XDP_TX or a redirect only to
// a peer that runs an XDP program too).
SEC("xdp")
int xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
