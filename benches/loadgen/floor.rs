//! The reference relay: no protocol, one thread, recvmmsg/sendmmsg.

use super::*;

// ---------------------------------------------------------------------------
// The reference relay: no protocol, one thread, recvmmsg/sendmmsg.

/// Client -> listener -> (relay socket of that client) -> peer -> relay
/// socket -> listener -> client. One relay socket per client address, as a
/// TURN server has one per allocation.
pub(super) fn floor_relay(listen: SocketAddr, args: &Args) -> Result<()> {
    let peer = args.floor_peer.ok_or_else(|| anyhow!("--floor-peer is required"))?;
    let lsock = UdpSocket::bind(listen).with_context(|| format!("bind {listen}"))?;
    lsock.set_nonblocking(true)?;
    set_buffers(lsock.as_raw_fd());
    let lfd = lsock.as_raw_fd();
    let relay_ip: IpAddr = listen.ip();
    let mut ep = Epoll::new(1024)?;
    const LISTENER: u64 = u64::MAX;
    ep.add(lfd, libc::EPOLLIN as u32, LISTENER)?;
    let mut by_client: HashMap<SocketAddr, usize> = HashMap::new();
    let mut relays: Vec<(UdpSocket, SocketAddr)> = Vec::new();
    let batch = args.batch.max(1);
    let cap = 65536.min(args.size + 128).max(2048);
    let mut inb = Mmsg::new(batch, cap);
    let mut out = Mmsg::new(batch, cap);
    let deadline = Instant::now() + Duration::from_secs(args.floor_max_secs);
    eprintln!("floor relay on {listen}, peer {peer}");
    while Instant::now() < deadline {
        let k = ep.wait(100);
        let mut outn = 0usize;
        for e in 0..k {
            let (tok, _) = ep.event(e);
            if tok == LISTENER {
                for _ in 0..4 {
                    let n = match inb.recv(lfd, true) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    // Forward runs of datagrams from one client with one sendmmsg.
                    let mut i = 0;
                    while i < n {
                        let Some(from) = inb.addr(i) else {
                            i += 1;
                            continue;
                        };
                        let r = match by_client.get(&from) {
                            Some(&r) => r,
                            None => {
                                if relays.len() >= MAX_CLIENTS {
                                    i += 1;
                                    continue;
                                }
                                let s = UdpSocket::bind((relay_ip, 0))?;
                                s.connect(peer)?;
                                s.set_nonblocking(true)?;
                                set_buffers(s.as_raw_fd());
                                ep.add(s.as_raw_fd(), libc::EPOLLIN as u32, relays.len() as u64)?;
                                relays.push((s, from));
                                by_client.insert(from, relays.len() - 1);
                                relays.len() - 1
                            }
                        };
                        let mut j = i;
                        while j < n && inb.addr(j) == Some(from) {
                            inb.iovs[j].iov_len = inb.hdrs[j].msg_len as usize;
                            inb.hdrs[j].msg_hdr.msg_name = std::ptr::null_mut();
                            inb.hdrs[j].msg_hdr.msg_namelen = 0;
                            j += 1;
                        }
                        inb.send(relays[r].0.as_raw_fd(), i, j);
                        i = j;
                    }
                    if n < inb.slots() {
                        break;
                    }
                }
            } else {
                let (s, client) = &relays[tok as usize];
                let fd = s.as_raw_fd();
                let client = *client;
                // Gather from relay sockets into one batch for the listener.
                loop {
                    if outn == out.slots() {
                        out.send(lfd, 0, outn);
                        outn = 0;
                    }
                    let got = match out.recv_into(fd, outn, out.slots(), false) {
                        Ok(n) if n > 0 => n,
                        _ => break,
                    };
                    for i in outn..outn + got {
                        let len = out.hdrs[i].msg_len as usize;
                        out.prepare(i, len, Some(client));
                    }
                    outn += got;
                    if outn < out.slots() {
                        break;
                    }
                }
            }
        }
        if outn > 0 {
            out.send(lfd, 0, outn);
        }
    }
    Ok(())
}
