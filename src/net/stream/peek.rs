//! Reading what a connection starts with (a PROXY header, a TLS
//! ClientHello) before deciding what to do with it, without consuming it.

use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// What a parser makes of the bytes peeked so far.
pub enum Peeked<T> {
    Done(T),
    /// More bytes are needed (and may still come).
    More,
    Invalid,
}

/// Peeks into `buf` until `parse` is done with what arrived, within
/// `timeout`. A peek returns at once while the bytes already there stay
/// unread, so the deadline is checked on every round, and a round that
/// found nothing new waits a little instead of spinning: a client that
/// sends half and stops is cut at the deadline.
pub async fn peek_until<T>(tcp: &TcpStream, buf: &mut [u8], timeout: Duration, mut parse: impl FnMut(&[u8]) -> Peeked<T>) -> std::io::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = 0;
    loop {
        let n = tokio::time::timeout_at(deadline, tcp.peek(buf))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match parse(&buf[..n]) {
            Peeked::Done(t) => return Ok(t),
            Peeked::More if n < buf.len() => {
                if Instant::now() >= deadline {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
                if n == last {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                last = n;
            }
            Peeked::More | Peeked::Invalid => return Err(std::io::ErrorKind::InvalidData.into()),
        }
    }
}
