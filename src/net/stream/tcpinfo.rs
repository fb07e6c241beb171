//! What the kernel knows of a TCP/TLS client's connection (TCP_INFO): the
//! round trip to the client and whether the path loses or holds back data.
//! Read when someone asks (the admin API's sessions, the log line of an
//! allocation that ends), never per packet.

use std::os::fd::AsRawFd;

use serde_json::{json, Value};

/// A connection's TCP figures at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TcpFigures {
    /// Smoothed round trip time and its variation, in milliseconds.
    pub rtt_ms: f64,
    pub rttvar_ms: f64,
    /// Segments retransmitted over the connection's life (tcpi_total_retrans).
    pub retransmits: u32,
    /// Segments sent and not yet acknowledged.
    pub unacked: u32,
    /// Bytes the kernel holds that were not sent yet; `None` on kernels older
    /// than 4.6, whose TCP_INFO ends before it.
    pub notsent_bytes: Option<u32>,
}

impl TcpFigures {
    /// Reads TCP_INFO of `socket`; `None` when the kernel refuses (not a
    /// TCP socket).
    pub fn read(socket: &impl AsRawFd) -> Option<TcpFigures> {
        // SAFETY: tcp_info is plain integers, for which all zeroes is valid.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: `info` is valid for writes of `len` bytes for the call, and
        // `len` is a valid socklen_t the kernel sets to what it wrote; the
        // descriptor is the open socket `socket` owns, borrowed for the call.
        let r = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&mut info as *mut libc::tcp_info).cast(),
                &mut len,
            )
        };
        // The kernel writes as much of the struct as it knows: every field
        // read here up to tcpi_total_retrans is older than any kernel turnd
        // runs on; tcpi_notsent_bytes came later.
        let has = |end: usize| len as usize >= end;
        if r != 0 || !has(std::mem::offset_of!(libc::tcp_info, tcpi_total_retrans) + 4) {
            return None;
        }
        let notsent_end = std::mem::offset_of!(libc::tcp_info, tcpi_notsent_bytes) + 4;
        Some(TcpFigures {
            rtt_ms: info.tcpi_rtt as f64 / 1000.0,
            rttvar_ms: info.tcpi_rttvar as f64 / 1000.0,
            retransmits: info.tcpi_total_retrans,
            unacked: info.tcpi_unacked,
            notsent_bytes: has(notsent_end).then_some(info.tcpi_notsent_bytes),
        })
    }

    /// As the admin API's sessions show it (`health.client_leg.tcp`).
    pub fn json(&self) -> Value {
        json!({
            "rtt_ms": self.rtt_ms,
            "rttvar_ms": self.rttvar_ms,
            "retransmits": self.retransmits,
            "unacked": self.unacked,
            "notsent_bytes": self.notsent_bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::TcpFigures;

    #[test]
    fn reads_a_loopback_connection_and_refuses_udp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (s, _) = l.accept().unwrap();
        std::io::Write::write_all(&mut &c, b"ping").unwrap();
        let mut b = [0u8; 4];
        std::io::Read::read_exact(&mut &s, &mut b).unwrap();
        let f = TcpFigures::read(&s).expect("TCP_INFO of a TCP socket");
        assert!(f.rtt_ms > 0.0 && f.rtt_ms < 1000.0, "{f:?}");
        assert_eq!(f.retransmits, 0);
        assert_eq!(f.notsent_bytes, Some(0));
        let v = f.json();
        assert!(v["rtt_ms"].is_f64() && v["unacked"].is_u64(), "{v}");
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        assert_eq!(TcpFigures::read(&u), None);
    }
}
