#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/seeds/{codec,server}/.

Run from anywhere: python3 fuzz/seeds/make_seeds.py. The files are committed;
this script documents and regenerates them. fuzz/run.sh gives libFuzzer the
seeds as a read-only second corpus directory.

codec: the four RFC 5769 vectors (read from tests/vectors/rfc5769.rs), TURN
messages built here (with MESSAGE-INTEGRITY and FINGERPRINT), ChannelData,
PROXY protocol v1/v2 headers and TLS ClientHellos (SNI, ALPN).

server: operation lists in the input format of fuzz_targets/server.rs:
  op = kind:u8 (mod 11), then
    0 raw:         client:u8 len:u16 bytes
    1|2 request:   client:u8 method:u8(mod 8; 7 -> u16) auth:u8(mod 7) flags:u8
                   nattrs:u8(mod 12) attr* [at:u16 xor:u8 when flags & 2]
                   auth: 0 none, 1 alice, 2 bob, 3 wrong key, 4 stale nonce,
                         5 alice with SHA-256, 6 expired user
                   flags: 1 FINGERPRINT, 2 flip a byte after signing,
                          bits 2-3 class (0 request)
                   attr = kind:u8(mod 12) then
                     0 REQUESTED-TRANSPORT p:u8 (<200 means UDP)
                     1 LIFETIME u32       2 XOR-PEER-ADDRESS peer
                     3 CHANNEL-NUMBER u16 (0x4000 | low 14 bits)
                     4 EVEN-PORT u8       5 RESERVATION-TOKEN s:u8 (even: last seen)
                     6 REQUESTED-ADDRESS-FAMILY f:u8   7 ADDITIONAL-ADDRESS-FAMILY f:u8
                     8 DONT-FRAGMENT      9 DATA n:u8 bytes
                     10 raw type:u16 n:u8 bytes        11 SOFTWARE n:u8
    3 send:        client:u8 peer n:u8 bytes
    4 channeldata: client:u8 channel:u16 delta:i8 n:u8 bytes
    5 peer data:   relay:u8 (0xFF: u32 id) peer n:u8 (0xFF 65535, 0xFE 65527,
                   0xFD 65516+u8%20) fill:u8 k:u8(mod 33) bytes(k), then filled to n
    6 advance:     u8 (0xFF: 3600 s, else mod 64 s)
    7 close:       client:u8          8 accepting: u8 (even: yes)
    9 disconnect:  user:u8 (alice, bob, static)   10 exhaust ports: u8 (odd: yes)
  peer = u8 index into PEERS (< 0xF0), or 0xF0 + u32 IPv4 + u16 port, 0xF1 + 16 bytes + u16
  clients: 0, 1 UDP 198.51.100.7 (two ports), 2 UDP IPv6, 3 TCP, 4 TLS
All integers big-endian.

server/regression_* are inputs that crashed the target once (each has a test
in tests/abuse.rs); they are kept as seeds and not written by this script.
"""

import hashlib
import hmac
import os
import re
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COOKIE = 0x2112A442


def write(kind, name, data):
    d = os.path.join(HERE, kind)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def msg_type(method, cls):
    m = method & 0xFFF
    return (m & 0xF) | ((m & 0x70) << 1) | ((m & 0xF80) << 2) | ((cls & 1) << 4) | ((cls & 2) << 7)


def attr(t, v):
    pad = (4 - len(v) % 4) % 4
    return struct.pack(">HH", t, len(v)) + v + b"\0" * pad


def message(method, cls, tid, attrs, key=None, fingerprint=False):
    body = b"".join(attrs)
    head = lambda extra: struct.pack(">HHI", msg_type(method, cls), len(body) + extra, COOKIE) + tid
    if key is not None:
        mac = hmac.new(key, head(24) + body, hashlib.sha1).digest()
        body += attr(0x0008, mac)
    if fingerprint:
        crc = zlib.crc32(head(8) + body) ^ 0x5354554E
        body += attr(0x8028, struct.pack(">I", crc & 0xFFFFFFFF))
    return head(0) + body


def xor_addr(ip4, port):
    return struct.pack(">BBH4s", 0, 1, port ^ (COOKIE >> 16), bytes(a ^ b for a, b in zip(bytes(ip4), struct.pack(">I", COOKIE))))


def sni_ext(name):
    n = name.encode()
    entry = b"\0" + struct.pack(">H", len(n)) + n
    return struct.pack(">H", len(entry)) + entry


def alpn_ext(names):
    body = b"".join(bytes([len(n)]) + n for n in names)
    return struct.pack(">H", len(body)) + body


def client_hello(exts):
    """One TLS record holding a ClientHello with these (type, data) extensions."""
    body = b"\x03\x03" + bytes(32) + b"\0" + b"\0\x02\x13\x01" + b"\x01\0"
    e = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in exts)
    body += struct.pack(">H", len(e)) + e
    hs = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def codec_seeds():
    text = open(os.path.join(ROOT, "tests", "vectors", "rfc5769.rs")).read()
    for name in ["REQ", "RESP_V4", "RESP_V6", "REQ_LONG_TERM"]:
        body = re.search(r"pub const %s: &\[u8\] = &\[(.*?)\];" % name, text, re.S).group(1)
        write("codec", "rfc5769_" + name.lower(), bytes(int(x, 16) for x in re.findall(r"0x([0-9a-fA-F]{2})", body)))
    tid = bytes(range(12))
    key = hashlib.md5(b"1800003600:alice:turnd:pw").digest()
    write("codec", "binding", message(0x001, 0, tid, []))
    write("codec", "binding_fingerprint", message(0x001, 0, tid, [], fingerprint=True))
    write("codec", "allocate_unauth", message(0x003, 0, tid, [attr(0x0019, b"\x11\0\0\0")]))
    creds = [attr(0x0006, b"1800003600:alice"), attr(0x0014, b"turnd"), attr(0x0015, b"AAAAAAAAAAAAAAAA")]
    write("codec", "allocate_signed", message(0x003, 0, tid, [attr(0x0019, b"\x11\0\0\0"), attr(0x000D, b"\0\0\x0e\x10")] + creds, key, True))
    write("codec", "channel_bind", message(0x009, 0, tid, [attr(0x000C, b"\x40\0\0\0"), attr(0x0012, xor_addr([8, 8, 8, 8], 5000))] + creds, key))
    write("codec", "send_indication", message(0x006, 1, tid, [attr(0x0012, xor_addr([8, 8, 8, 8], 5000)), attr(0x0013, b"hello")]))
    write("codec", "error_401", message(0x003, 3, tid, [attr(0x0009, b"\0\0\x04\x01Unauthorized"), attr(0x0014, b"turnd"), attr(0x0015, b"AAAAAAAAAAAAAAAA")]))
    write("codec", "error_420", message(0x001, 3, tid, [attr(0x0009, b"\0\0\x04\x14Unknown Attribute"), attr(0x000A, b"\x77\x77")]))
    write("codec", "channel_data", b"\x40\x00\x00\x05hello\0\0\0")
    write("codec", "channel_data_max", b"\x4f\xff\xff\xff" + b"\xaa" * 64)
    write("codec", "proxy_v1", b"PROXY TCP4 198.51.100.1 192.0.2.1 40000 443\r\n\x16\x03\x01")
    write("codec", "proxy_v1_unknown", b"PROXY UNKNOWN\r\n")
    v2 = b"\r\n\r\n\0\r\nQUIT\n"
    write("codec", "proxy_v2_v4", v2 + bytes([0x21, 0x11, 0, 12, 198, 51, 100, 1, 192, 0, 2, 1, 0x9C, 0x40, 0x01, 0xBB]))
    write("codec", "proxy_v2_v6", v2 + bytes([0x21, 0x21, 0, 36]) + bytes(range(32)) + b"\x9c\x40\x01\xbb")
    write("codec", "proxy_v2_local", v2 + bytes([0x20, 0x00, 0, 0]))
    write("codec", "client_hello_sni_alpn", client_hello([(0, sni_ext("web.example")), (16, alpn_ext([b"h2", b"http/1.1"])), (10, b"\0\x02\0\x1d")]))
    write("codec", "client_hello_turn", client_hello([(0, sni_ext("turn.example")), (16, alpn_ext([b"stun.turn"]))]))
    write("codec", "client_hello_bare", client_hello([]))
    write("codec", "rest_username", b"1800003600:alice")
    write("codec", "writer_recipe", b"\x80\x00\x01" + b"\x80\x13\x00\x10" + b"\x00\x00\x00\x00" + b"\x80\x22\xff\xf0")


# ---- server ----

def u8(x):
    return bytes([x & 0xFF])


def u16(x):
    return struct.pack(">H", x & 0xFFFF)


def u32(x):
    return struct.pack(">I", x & 0xFFFFFFFF)


METHOD = {"binding": 0, "allocate": 1, "refresh": 2, "create_permission": 3, "channel_bind": 4, "send": 5, "data": 6}


def req(client, method, auth, attrs=(), flags=0, mutate=None):
    b = u8(1) + u8(client) + u8(METHOD[method]) + u8(auth) + u8(flags) + u8(len(attrs)) + b"".join(attrs)
    if flags & 2:
        b += u16(mutate[0]) + u8(mutate[1])
    return b


A_TRANSPORT = u8(0) + u8(0)
A_TCP = u8(0) + u8(206)


def a_lifetime(x):
    return u8(1) + u32(x)


def a_peer(p):
    return u8(2) + u8(p)


def a_channel(c):
    return u8(3) + u16(c)


def a_even(r):
    return u8(4) + u8(0x80 if r else 0)


A_TOKEN_LAST = u8(5) + u8(0)
A_V6 = u8(6) + u8(2)
A_DUAL = u8(7) + u8(2)


def a_raw(t, v):
    return u8(10) + u16(t) + u8(len(v)) + v


def raw(client, data):
    return u8(0) + u8(client) + u16(len(data)) + data


def send(client, peer, data):
    return u8(3) + u8(client) + u8(peer) + u8(len(data)) + data


def chdata(client, ch, data, delta=0):
    return u8(4) + u8(client) + u16(ch) + u8(delta) + u8(len(data)) + data


def peer_data(relay, peer, n, fill=0x55, data=b"", extra=0):
    size = u8(n) + (u8(extra) if n == 0xFD else b"")
    return u8(5) + u8(relay) + u8(peer) + size + u8(fill) + u8(len(data)) + data


def advance(s):
    return u8(6) + u8(s)


def server_seeds():
    alloc = lambda c, auth, *extra: req(c, "allocate", auth, [A_TRANSPORT, *extra])
    write("server", "allocate_permission_channel", b"".join([
        req(0, "allocate", 0, [A_TRANSPORT]),
        alloc(0, 1),
        req(0, "create_permission", 1, [a_peer(0)]),
        send(0, 0, b"hello"),
        peer_data(0, 0, 5, data=b"world"),
        req(0, "channel_bind", 1, [a_channel(0x4000), a_peer(0)]),
        chdata(0, 0x4000, b"abcd"),
        peer_data(0, 0, 3, data=b"xyz"),
        req(0, "refresh", 1, [a_lifetime(600)]),
        req(0, "refresh", 1, [a_lifetime(0)]),
    ]))
    write("server", "tcp_dual_big_peer_data", b"".join([
        alloc(3, 1, A_DUAL),
        req(3, "create_permission", 1, [a_peer(3), a_peer(0)]),
        peer_data(1, 3, 0xFE),
        req(3, "channel_bind", 1, [a_channel(0x4001), a_peer(3)]),
        peer_data(1, 3, 0xFE),
        peer_data(1, 3, 0xFF),
        peer_data(0, 0, 0xFD, extra=3),
        u8(7) + u8(3),
    ]))
    write("server", "ipv6_data_indication_limits", b"".join([
        alloc(2, 2, A_V6),
        req(2, "create_permission", 2, [a_peer(3)]),
        peer_data(0, 3, 0xFE),
        peer_data(0, 3, 0xFD, extra=0),
        peer_data(0, 3, 0xFD, extra=11),
    ]))
    write("server", "even_port_reservation", b"".join([
        alloc(0, 1, a_even(True)),
        alloc(1, 2, A_TOKEN_LAST),
        alloc(2, 1, a_even(True)),
        advance(40),
        alloc(3, 2, A_TOKEN_LAST),
    ]))
    write("server", "own_ports_and_hairpin", b"".join([
        alloc(0, 1),
        alloc(1, 2),
        req(0, "create_permission", 1, [a_peer(6)]),
        send(0, 6, b"\x00\x01\x00\x00\x21\x12\xa4\x42binding-req!"),
        req(0, "channel_bind", 1, [a_channel(0x4000), a_peer(6)]),
        req(0, "create_permission", 1, [a_peer(7), a_peer(8)]),
        send(0, 7, b"hairpin"),
        send(0, 8, b"hairpin"),
        req(0, "create_permission", 1, [a_peer(0), a_peer(4)]),
        req(0, "channel_bind", 1, [a_channel(0x4001), a_peer(9)]),
        peer_data(0, 8, 4, data=b"back"),
    ]))
    write("server", "quotas_and_disconnect", b"".join([
        alloc(0, 1), alloc(1, 1), alloc(2, 1), alloc(3, 2), alloc(4, 2),
        u8(9) + u8(0),
        alloc(2, 1),
        u8(10) + u8(1),
        alloc(0, 2),
        u8(8) + u8(1),
        alloc(1, 1),
        advance(0xFF),
    ]))
    write("server", "credential_failures", b"".join([
        alloc(0, 3), alloc(0, 4), alloc(0, 6), alloc(0, 5),
        req(0, "refresh", 5, [a_lifetime(0xFFFFFFFF)]),
        req(1, "allocate", 1, [A_TRANSPORT], flags=2, mutate=(3, 0x40)),
        req(1, "allocate", 1, [A_TCP]),
        req(1, "allocate", 1, [A_TRANSPORT, a_raw(0x7777, b"")], flags=1),
    ]))
    tid = bytes(range(12))
    rfc = os.path.join(HERE, "codec")
    write("server", "raw_messages", b"".join([
        raw(0, message(0x001, 0, tid, [])),
        raw(2, message(0x001, 0, tid, [attr(0x7777, b"")])),
        raw(0, message(0x003, 0, tid, [])),
        raw(3, message(0x0FF, 0, tid, [])),
        raw(0, b"\x40\x00\x00\x08abcd"),
        raw(1, open(os.path.join(rfc, "rfc5769_req"), "rb").read()),
        raw(4, open(os.path.join(rfc, "rfc5769_req_long_term"), "rb").read()),
    ]))


codec_seeds()
server_seeds()
print("seeds written to", HERE)
