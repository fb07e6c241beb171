// SPDX-License-Identifier: (MIT OR Apache-2.0)
// turnd's XDP fast path (feature `xdp`, see src/net/xdp/mod.rs).
//
// UDP over IPv4 and IPv6, and across them. A ChannelData message from a
// client to a listener, on a channel turnd mirrored into `chan4` (`chan6`
// for a client over IPv6), leaves as a UDP datagram from the allocation's
// relayed address to the peer; a datagram from a peer to a relayed address
// whose channel is in `peer4` (`peer6`) leaves as ChannelData to the client.
// The peer and the client may be of different families: the entry says
// which, and the program writes the other family's headers. Every check
// comes before the first write, so anything else (STUN, Send/Data
// indications, fragments, IP options, IPv6 extension headers, padded
// ChannelData, unknown or expired channels, no route or neighbour yet, a
// datagram that would not fit the egress MTU) passes to the socket path
// untouched.
//
// Bandwidth caps are held here too, as turnd holds them: a packet over its
// allocation's cap or the relay's total is dropped and counted (`buckets`).
//
// The channel maps are not preallocated: an entry turnd replaces is freed
// after an RCU grace period, so a packet never reads half of another's.
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

// Every address and port in network byte order; an address of either
// family in four words, an IPv4 one in the first.

// A client's channel: the client, the listener it sends to, the number.
struct chan4_key {
	__u32 client_ip;
	__u32 listen_ip; // 0 for a wildcard listener
	__u16 client_port;
	__u16 listen_port;
	__u16 channel; // as on the wire
	__u16 pad;
};

struct chan6_key {
	__u32 client_ip[4];
	__u32 listen_ip[4];
	__u16 client_port;
	__u16 listen_port;
	__u16 channel;
	__u16 pad;
};

// Where the channel's ChannelData goes (the value of chan4 and chan6).
struct to_peer {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
	__u32 stat; // index in `stats`
	__u32 bucket; // index in `buckets` of the allocation's cap (none: out of range)
	__u8 peer_v6; // the peer (and the relayed address) over IPv6
	__u8 pad[3];
	__u64 expires_ns; // CLOCK_MONOTONIC
};

// A peer's datagrams to a relayed address.
struct peer4_key {
	__u32 relay_ip;
	__u32 peer_ip;
	__u16 relay_port;
	__u16 peer_port;
};

struct peer6_key {
	__u32 relay_ip[4];
	__u32 peer_ip[4];
	__u16 relay_port;
	__u16 peer_port;
};

// Where they go as ChannelData (the value of peer4 and peer6).
struct to_client {
	__u32 client_ip[4];
	__u32 listen_ip[4]; // zeros for a wildcard listener
	__u16 client_port;
	__u16 listen_port;
	__u16 channel;
	__u8 client_v6; // the client (and the listener) over IPv6
	__u8 pad;
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

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan4_key);
	__type(value, struct to_peer);
} chan4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_STATS);
	__type(key, struct chan6_key);
	__type(value, struct to_peer);
} chan6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer4_key);
	__type(value, struct to_client);
} peer4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(max_entries, MAX_STATS);
	__type(key, struct peer6_key);
	__type(value, struct to_client);
} peer6 SEC(".maps");

// The interfaces the program is attached to, by index: a packet is sent on
// only toward one of them (a redirect to an interface without XDP support,
// a VLAN or a tunnel, would be lost), else it goes the socket path.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u32);
} egress SEC(".maps");

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
#define IP4_LEN 20
#define IP6_LEN 40
#define UDP_LEN 8
#define CD_LEN 4
// What turnd charges a payload for its headers on the wire: IP and UDP on
// the peer's leg, the ChannelData header on the client's.
#define FRAMING(v6) ((v6 ? IP6_LEN : IP4_LEN) + UDP_LEN + CD_LEN)

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
		// Another CPU may have taken the lock with a later `now`: no refill
		// then, and `last` never goes back.
		__u64 last = b->last[dir];
		__u64 elapsed = now > last ? now - last : 0;
		if (elapsed > NANOS)
			elapsed = NANOS;
		__u64 level = b->level[dir] + rate * elapsed;
		if (level < b->level[dir] || level > cap)
			level = cap;
		if (now > last)
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

// Adds or takes away an address of one family (four words, or one).
static __always_inline __u32 addr_sum(__u32 sum, const __u32 *a, const int v6, const int add)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (i == 0 || v6)
			sum = add ? add32(sum, a[i]) : sub32(sum, a[i]);
	}
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
// ingress interface, over the MTU, an egress the program is not attached
// to) leaves the packet to the socket path.
// With a zero `src` (a client of a wildcard listener), the lookup derives
// the source address too (BPF_FIB_LOOKUP_SRC, kernel 6.7 and later): the one
// the kernel would send a reply from, as turnd's wildcard socket does.
static __always_inline int route(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const __u32 *src, const __u32 *dst, const int v6, __u16 tot_len)
{
	__builtin_memset(fib, 0, sizeof(*fib));
	fib->family = v6 ? AF_INET6 : AF_INET;
	fib->l4_protocol = IPPROTO_UDP;
	fib->tot_len = tot_len;
	int wildcard;
	if (v6) {
		__builtin_memcpy(fib->ipv6_src, src, 16);
		__builtin_memcpy(fib->ipv6_dst, dst, 16);
		wildcard = !(src[0] | src[1] | src[2] | src[3]);
	} else {
		fib->ipv4_src = src[0];
		fib->ipv4_dst = dst[0];
		wildcard = !src[0];
	}
	fib->ifindex = ctx->ingress_ifindex;
	int r = bpf_fib_lookup(ctx, fib, sizeof(*fib), wildcard ? BPF_FIB_LOOKUP_SRC : 0);
	if (r == BPF_FIB_LKUP_RET_SUCCESS && !bpf_map_lookup_elem(&egress, &fib->ifindex))
		return -1;
	return r;
}

static __always_inline int send(struct xdp_md *ctx, struct bpf_fib_lookup *fib)
{
	if (fib->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib->ifindex, 0);
}

// Writes Ethernet, IP (of the family `v6` says) and UDP headers at the
// start of the packet, a UDP payload of `ulen` - 8 bytes after them; the
// pointer to that payload, or NULL when the packet is too short.
static __always_inline __u8 *write_headers(struct xdp_md *ctx, struct bpf_fib_lookup *fib, const int v6, const __u32 *src, const __u32 *dst,
					    __u16 sport, __u16 dport, __u16 ulen, __u16 csum, const int room)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct udphdr *udp = data + sizeof(*eth) + (v6 ? IP6_LEN : IP4_LEN);
	__u8 *pl = (void *)(udp + 1);
	if ((void *)(pl + room) > end)
		return NULL;
	__builtin_memcpy(eth->h_dest, fib->dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib->smac, ETH_ALEN);
	if (v6) {
		struct ipv6hdr *ip = (void *)(eth + 1);
		eth->h_proto = bpf_htons(ETH_P_IPV6);
		*(__u32 *)ip = bpf_htonl(0x60000000); // version 6, no traffic class or flow label
		ip->payload_len = bpf_htons(ulen);
		ip->nexthdr = IPPROTO_UDP;
		ip->hop_limit = 64;
		__builtin_memcpy(&ip->saddr, src, 16);
		__builtin_memcpy(&ip->daddr, dst, 16);
	} else {
		struct iphdr *ip = (void *)(eth + 1);
		eth->h_proto = bpf_htons(ETH_P_IP);
		*(__u16 *)ip = bpf_htons(0x4500); // version 4, 5 words, no TOS
		ip->tot_len = bpf_htons(ulen + IP4_LEN);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000); // don't fragment, as turnd's sockets send
		ip->ttl = 64;
		ip->protocol = IPPROTO_UDP;
		ip->saddr = src[0];
		ip->daddr = dst[0];
		ip->check = ip_checksum(ip);
	}
	udp->source = sport;
	udp->dest = dport;
	udp->len = bpf_htons(ulen);
	udp->check = csum;
	return pl;
}

// The checksum of the rewritten datagram, from the old one: the payload keeps
// its place modulo two bytes (every header length here is even), so only
// the pseudo-header, the UDP header and the ChannelData header change.
// `old_cd`/`new_cd`: the ChannelData header taken away or put in (or NULL).
static __always_inline __u16 update_checksum(__u16 check, const __u32 *old_src, const __u32 *old_dst, const int in6, struct udphdr *udp,
					     const __u16 *old_cd, const __u32 *new_src, const __u32 *new_dst, const int out6, __u16 sport,
					     __u16 dport, __u16 new_ulen, const __u16 *new_cd)
{
	__u32 sum = (__u16)~check;
	sum = addr_sum(sum, old_src, in6, 0);
	sum = addr_sum(sum, old_dst, in6, 0);
	sum = sub16(sum, udp->source);
	sum = sub16(sum, udp->dest);
	sum = sub16(sum, udp->len); // the pseudo-header's length
	sum = sub16(sum, udp->len); // the UDP header's
	if (old_cd) {
		sum = sub16(sum, old_cd[0]);
		sum = sub16(sum, old_cd[1]);
	}
	sum = addr_sum(sum, new_src, out6, 1);
	sum = addr_sum(sum, new_dst, out6, 1);
	sum = add16(sum, sport);
	sum = add16(sum, dport);
	sum = add16(sum, bpf_htons(new_ulen));
	sum = add16(sum, bpf_htons(new_ulen));
	if (new_cd) {
		sum = add16(sum, new_cd[0]);
		sum = add16(sum, new_cd[1]);
	}
	__u16 csum = ~fold(sum);
	return csum ? csum : 0xffff;
}

// A client's ChannelData (over IPv6 when `in6`, with the addresses at `src`
// and `dst` of its IP header) leaves as the payload of a datagram from the
// relayed address to the peer of entry `v` (over IPv6 when `out6`).
static __always_inline int to_peer(struct xdp_md *ctx, const __u32 *src, const __u32 *dst, struct udphdr *udp, __u8 *pl, __u16 ulen,
				   const int in6, const int out6, struct to_peer *v)
{
	__u64 now = bpf_ktime_get_ns();
	__u16 plen = ulen - UDP_LEN;
	__u16 cd_len = ((__u16)pl[2] << 8) | pl[3];
	// Exactly the message: padded ChannelData goes the socket way. So does
	// an IPv4 datagram without a checksum bound for IPv6, which needs one.
	if (now >= v->expires_ns || cd_len + CD_LEN != plen || (!in6 && out6 && !udp->check))
		return XDP_PASS;
	__u16 new_ulen = ulen - CD_LEN;
	struct bpf_fib_lookup fib;
	if (route(ctx, &fib, v->relay_ip, v->peer_ip, out6, new_ulen + (out6 ? IP6_LEN : IP4_LEN)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	__u32 relay_ip[4], peer_ip[4];
	__builtin_memcpy(relay_ip, v->relay_ip, 16);
	__builtin_memcpy(peer_ip, v->peer_ip, 16);
	__u32 idx = v->stat, bucket = v->bucket;
	__u16 relay_port = v->relay_port, peer_port = v->peer_port;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, TO_PEER, cd_len + FRAMING(out6), now, s))
		return XDP_DROP;
	__u16 csum = 0; // an IPv4 datagram without one stays without
	if (udp->check)
		csum = update_checksum(udp->check, src, dst, in6, udp, (__u16 *)pl, relay_ip, peer_ip, out6, relay_port, peer_port, new_ulen, NULL);
	// The headers before the payload: IP, UDP and ChannelData in; IP and UDP out.
	if (bpf_xdp_adjust_head(ctx, (in6 ? IP6_LEN : IP4_LEN) + CD_LEN - (out6 ? IP6_LEN : IP4_LEN)))
		return XDP_PASS;
	if (!write_headers(ctx, &fib, out6, relay_ip, peer_ip, relay_port, peer_port, new_ulen, csum, 0))
		return XDP_DROP;
	if (s) {
		s->to_peer_packets++;
		s->to_peer_bytes += cd_len;
	}
	return send(ctx, &fib);
}

// A peer's datagram (over IPv6 when `in6`) to a relayed address leaves as
// ChannelData to the client of entry `pv` (over IPv6 when `out6`).
static __always_inline int to_client(struct xdp_md *ctx, const __u32 *src, const __u32 *dst, struct udphdr *udp, __u16 ulen,
				     const int in6, const int out6, struct to_client *pv)
{
	__u64 now = bpf_ktime_get_ns();
	__u16 plen = ulen - UDP_LEN;
	if (now >= pv->expires_ns || plen > 0xffff - UDP_LEN - CD_LEN || (!in6 && out6 && !udp->check))
		return XDP_PASS;
	__u16 new_ulen = ulen + CD_LEN;
	struct bpf_fib_lookup fib;
	if (route(ctx, &fib, pv->listen_ip, pv->client_ip, out6, new_ulen + (out6 ? IP6_LEN : IP4_LEN)) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;
	// The listener's address, or for a wildcard listener the one the route derived.
	__u32 listen_ip[4] = {}, client_ip[4];
	if (pv->listen_ip[0] | pv->listen_ip[1] | pv->listen_ip[2] | pv->listen_ip[3])
		__builtin_memcpy(listen_ip, pv->listen_ip, 16);
	else if (out6)
		__builtin_memcpy(listen_ip, fib.ipv6_src, 16);
	else
		listen_ip[0] = fib.ipv4_src;
	__builtin_memcpy(client_ip, pv->client_ip, 16);
	__u16 cd[2] = { pv->channel, bpf_htons(plen) };
	__u32 idx = pv->stat, bucket = pv->bucket;
	__u16 listen_port = pv->listen_port, client_port = pv->client_port;
	struct stat *s = bpf_map_lookup_elem(&stats, &idx);
	if (!within_caps(bucket, FROM_PEER, plen + FRAMING(in6), now, s))
		return XDP_DROP;
	__u16 csum = 0;
	if (udp->check)
		csum = update_checksum(udp->check, src, dst, in6, udp, NULL, listen_ip, client_ip, out6, listen_port, client_port, new_ulen, cd);
	// The headers before the payload: IP and UDP in; IP, UDP and ChannelData out.
	if (bpf_xdp_adjust_head(ctx, (in6 ? IP6_LEN : IP4_LEN) - (out6 ? IP6_LEN : IP4_LEN) - CD_LEN))
		return XDP_PASS;
	__u8 *pl = write_headers(ctx, &fib, out6, listen_ip, client_ip, listen_port, client_port, new_ulen, csum, CD_LEN);
	if (!pl)
		return XDP_DROP;
	__builtin_memcpy(pl, cd, CD_LEN);
	if (s) {
		s->from_peer_packets++;
		s->from_peer_bytes += plen;
	}
	return send(ctx, &fib);
}

// A UDP datagram over IPv4: no options, no fragments, lengths that agree
// with the frame.
static __always_inline int relay4(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)ip + IP4_LEN;
	__u8 *pl = (void *)(udp + 1);

	if ((void *)pl > end)
		return XDP_PASS;
	if (ip->ihl != 5 || ip->version != 4 || (ip->frag_off & bpf_htons(0x3fff)) || ip->protocol != IPPROTO_UDP)
		return XDP_PASS;
	__u16 tot_len = bpf_ntohs(ip->tot_len);
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < UDP_LEN || tot_len != ulen + IP4_LEN || (void *)ip + tot_len > end)
		return XDP_PASS;

	// A client's ChannelData to a listener: channel numbers are 0x4000-0x7FFF.
	if (ulen >= UDP_LEN + CD_LEN && (void *)(pl + CD_LEN) <= end && (pl[0] & 0xC0) == 0x40) {
		struct chan4_key k = {
			.client_ip = ip->saddr,
			.listen_ip = ip->daddr,
			.client_port = udp->source,
			.listen_port = udp->dest,
			.channel = *(__u16 *)pl,
		};
		struct to_peer *v = bpf_map_lookup_elem(&chan4, &k);
		if (!v) {
			// A client of a wildcard listener: keyed with a zero address.
			k.listen_ip = 0;
			v = bpf_map_lookup_elem(&chan4, &k);
		}
		if (v)
			return v->peer_v6 ? to_peer(ctx, &ip->saddr, &ip->daddr, udp, pl, ulen, 0, 1, v)
					  : to_peer(ctx, &ip->saddr, &ip->daddr, udp, pl, ulen, 0, 0, v);
	}

	// A peer's datagram to a relayed address with a bound channel.
	struct peer4_key pk = {
		.relay_ip = ip->daddr,
		.peer_ip = ip->saddr,
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	struct to_client *pv = bpf_map_lookup_elem(&peer4, &pk);
	if (!pv)
		return XDP_PASS;
	return pv->client_v6 ? to_client(ctx, &ip->saddr, &ip->daddr, udp, ulen, 0, 1, pv)
			     : to_client(ctx, &ip->saddr, &ip->daddr, udp, ulen, 0, 0, pv);
}

// The same over IPv6, without fragments or extension headers (the next
// header must be UDP), and never with a zero UDP checksum (IPv6 requires one).
static __always_inline int relay6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ipv6hdr *ip = data + sizeof(struct ethhdr);
	struct udphdr *udp = (void *)ip + IP6_LEN;
	__u8 *pl = (void *)(udp + 1);

	if ((void *)pl > end)
		return XDP_PASS;
	if (ip->nexthdr != IPPROTO_UDP || !udp->check)
		return XDP_PASS;
	__u16 ulen = bpf_ntohs(udp->len);
	if (ulen < UDP_LEN || bpf_ntohs(ip->payload_len) != ulen || (void *)udp + ulen > end)
		return XDP_PASS;
	const __u32 *src = (__u32 *)&ip->saddr, *dst = (__u32 *)&ip->daddr;

	if (ulen >= UDP_LEN + CD_LEN && (void *)(pl + CD_LEN) <= end && (pl[0] & 0xC0) == 0x40) {
		struct chan6_key k = {
			.client_port = udp->source,
			.listen_port = udp->dest,
			.channel = *(__u16 *)pl,
		};
		__builtin_memcpy(k.client_ip, src, 16);
		__builtin_memcpy(k.listen_ip, dst, 16);
		struct to_peer *v = bpf_map_lookup_elem(&chan6, &k);
		if (!v) {
			__builtin_memset(k.listen_ip, 0, 16);
			v = bpf_map_lookup_elem(&chan6, &k);
		}
		if (v)
			return v->peer_v6 ? to_peer(ctx, src, dst, udp, pl, ulen, 1, 1, v) : to_peer(ctx, src, dst, udp, pl, ulen, 1, 0, v);
	}

	struct peer6_key pk = {
		.relay_port = udp->dest,
		.peer_port = udp->source,
	};
	__builtin_memcpy(pk.relay_ip, dst, 16);
	__builtin_memcpy(pk.peer_ip, src, 16);
	struct to_client *pv = bpf_map_lookup_elem(&peer6, &pk);
	if (!pv)
		return XDP_PASS;
	return pv->client_v6 ? to_client(ctx, src, dst, udp, ulen, 1, 1, pv) : to_client(ctx, src, dst, udp, ulen, 1, 0, pv);
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
