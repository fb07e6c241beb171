//! Reaching a TURN server through an HTTP proxy, as browsers do behind one:
//! `CONNECT HOST:PORT`, a `200` answer, then the TCP stream is a tunnel that
//! carries TURN (or TLS and TURN) untouched. UDP never goes through an HTTP
//! proxy. The proxy comes from a URL (`http://[user:pass@]host:port`) or the
//! usual environment variables: `HTTPS_PROXY`/`https_proxy`, then
//! `ALL_PROXY`/`all_proxy`, unless `NO_PROXY`/`no_proxy` names the target.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::{fmt_duration, Error};

/// Longest proxy answer header this client reads.
const MAX_HEADER: usize = 16 * 1024;

/// An HTTP proxy that tunnels with CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpProxy {
    pub host: String,
    pub port: u16,
    /// `user:pass`, already percent-decoded (sent as Basic credentials).
    auth: Option<String>,
}

impl HttpProxy {
    /// Sends `user:pass` (as read from a file or the environment, not the
    /// command line) as the proxy's Basic credentials.
    pub fn with_auth(mut self, user_pass: &str) -> Result<HttpProxy, String> {
        let up = user_pass.trim();
        if up.is_empty() || !up.contains(':') {
            return Err("proxy credentials must be USER:PASS".into());
        }
        self.auth = Some(up.to_owned());
        Ok(self)
    }

    /// `http://[user:pass@]host[:port]` (port 80 when left out; `http://`
    /// may be left out too).
    pub fn parse(url: &str) -> Result<HttpProxy, String> {
        let u = url.trim();
        let rest = match u.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
            Some((scheme, _)) => {
                return Err(format!("proxy `{}`: only http:// proxies are supported, not {scheme}://", redact(u)));
            }
            None => u,
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(format!("proxy `{}`: expected http://[user:pass@]host:port, nothing after the port", redact(u)));
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((userinfo, hp)) => {
                let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
                (Some(format!("{}:{}", percent_decode(user)?, percent_decode(pass)?)), hp)
            }
            None => (None, rest),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| format!("proxy `{}`: unclosed [", redact(u)))?;
            (h, after.strip_prefix(':'))
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (hostport, None),
            }
        };
        if host.is_empty() {
            return Err(format!("proxy `{}`: no host", redact(u)));
        }
        let port = match port {
            None => 80,
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("proxy `{}`: bad port `{p}`", redact(u)))?,
        };
        Ok(HttpProxy { host: host.to_owned(), port, auth })
    }

    /// The proxy the environment sets for reaching `target` (a host name or
    /// address), from `var` (the environment, or a stand-in for tests):
    /// `HTTPS_PROXY`, `https_proxy`, `ALL_PROXY`, `all_proxy`, the first set
    /// and non-empty; none when `NO_PROXY`/`no_proxy` covers `target`.
    pub fn from_env(target: &str, var: impl Fn(&str) -> Option<String>) -> Option<Result<HttpProxy, String>> {
        let get = |names: &[&'static str]| -> Option<(&'static str, String)> {
            names.iter().find_map(|n| var(n).filter(|v| !v.trim().is_empty()).map(|v| (*n, v)))
        };
        let (name, url) = get(&["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])?;
        if let Some((_, list)) = get(&["NO_PROXY", "no_proxy"])
            && no_proxy_covers(&list, target)
        {
            return None;
        }
        Some(HttpProxy::parse(&url).map_err(|e| format!("{name}: {e}")))
    }

    /// The URL without the password, for reports.
    pub fn display(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match &self.auth {
            Some(a) => format!("http://{}:***@{host}:{}", a.split(':').next().unwrap_or(""), self.port),
            None => format!("http://{host}:{}", self.port),
        }
    }

    /// A TCP stream to `host:port` through the proxy: connects to the proxy,
    /// sends CONNECT and reads the answer, all within `timeout`. On `200`
    /// the stream is the tunnel; any other answer is
    /// [`Error::ProxyRefused`], trouble reaching the proxy [`Error::Proxy`].
    pub fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<TcpStream, Error> {
        let deadline = Instant::now() + timeout;
        let proxy_err = |what: String| Error::Proxy(format!("{}: {what}", self.display()));
        let addrs = resolve(&self.host, self.port, timeout).map_err(proxy_err)?;
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match TcpStream::connect_timeout(&a, left) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let mut s = stream.ok_or_else(|| match last {
            Some(e) if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) => {
                proxy_err(format!("no TCP connection within {}", fmt_duration(timeout)))
            }
            Some(e) => proxy_err(format!("cannot connect: {e}")),
            None => proxy_err(format!("no TCP connection within {}", fmt_duration(timeout))),
        })?;
        let target = authority(host, port);
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(a) = &self.auth {
            req += &format!("Proxy-Authorization: Basic {}\r\n", base64::engine::general_purpose::STANDARD.encode(a));
        }
        req += "\r\n";
        s.set_write_timeout(Some(timeout)).map_err(Error::Io)?;
        s.write_all(req.as_bytes()).map_err(|e| proxy_err(format!("sending CONNECT: {e}")))?;
        // The answer's header, a byte at a time: nothing of the tunnel may be
        // read here (the server speaks only after we do, but be exact).
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(proxy_err(format!("no answer to CONNECT within {}", fmt_duration(timeout))));
            }
            s.set_read_timeout(Some(left.max(Duration::from_millis(1)))).map_err(Error::Io)?;
            match s.read(&mut byte) {
                Ok(0) => return Err(proxy_err("closed the connection without answering CONNECT".into())),
                Ok(_) => head.push(byte[0]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => {}
                Err(e) => return Err(proxy_err(format!("reading the answer to CONNECT: {e}"))),
            }
            if head.len() > MAX_HEADER {
                return Err(proxy_err("answered CONNECT with an oversized header".into()));
            }
        }
        let text = String::from_utf8_lossy(&head);
        let status_line = text.lines().next().unwrap_or("");
        let mut parts = status_line.splitn(3, ' ');
        let (version, code, reason) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let status = code.parse::<u16>().ok().filter(|_| version.starts_with("HTTP/"));
        match status {
            Some(200..=299) => {
                s.set_read_timeout(None).map_err(Error::Io)?;
                Ok(s)
            }
            Some(status) => Err(Error::ProxyRefused {
                proxy: self.display(),
                target,
                status,
                reason: reason.trim().to_owned(),
            }),
            None => Err(proxy_err(format!("not an HTTP proxy (answered {:?})", status_line.chars().take(60).collect::<String>()))),
        }
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn authority(host: &str, port: u16) -> String {
    if host.parse::<std::net::Ipv6Addr>().is_ok() { format!("[{host}]:{port}") } else { format!("{host}:{port}") }
}

/// The password replaced by `***`, for error messages.
fn redact(url: &str) -> String {
    match url.rsplit_once('@') {
        Some((before, after)) => {
            let (scheme, userinfo) = before.split_once("://").map(|(s, u)| (format!("{s}://"), u)).unwrap_or((String::new(), before));
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}{user}:***@{after}")
        }
        None => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> Result<String, String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
            out.push(hex.ok_or("bad %-escape in the proxy's user name or password")?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "the proxy's user name or password is not UTF-8".into())
}

/// Whether a `NO_PROXY` list covers `target`: `*`, the name itself, a
/// domain it is in (`example.com` and `.example.com` both cover
/// `turn.example.com`), an address, or an address block (`198.51.100.0/24`).
pub fn no_proxy_covers(list: &str, target: &str) -> bool {
    let target = target.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
    let ip = target.parse::<IpAddr>().ok();
    list.split(',').map(|e| e.trim().to_ascii_lowercase()).filter(|e| !e.is_empty()).any(|e| {
        if e == "*" {
            return true;
        }
        if let (Some(ip), Some((net, bits))) = (ip, e.split_once('/')) {
            return match (ip, net.parse::<IpAddr>(), bits.parse::<u32>()) {
                (IpAddr::V4(a), Ok(IpAddr::V4(n)), Ok(b)) if b <= 32 => {
                    let mask = u32::MAX.checked_shl(32 - b).unwrap_or(0);
                    u32::from(a) & mask == u32::from(n) & mask
                }
                (IpAddr::V6(a), Ok(IpAddr::V6(n)), Ok(b)) if b <= 128 => {
                    let mask = u128::MAX.checked_shl(128 - b).unwrap_or(0);
                    u128::from(a) & mask == u128::from(n) & mask
                }
                _ => false,
            };
        }
        let e = e.trim_start_matches("*.").trim_start_matches('.').trim_start_matches('[');
        let e = e.split(']').next().unwrap_or(e);
        if let (Some(ip), Ok(other)) = (ip, e.parse::<IpAddr>()) {
            return ip == other;
        }
        target == e || target.ends_with(&format!(".{e}"))
    })
}

/// `host:port` to addresses within `timeout` (getaddrinfo has no timeout).
fn resolve(host: &str, port: u16, timeout: Duration) -> Result<Vec<SocketAddr>, String> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let h = host.to_owned();
    std::thread::spawn(move || {
        let _ = tx.send((h.as_str(), port).to_socket_addrs().map(|it| it.collect::<Vec<_>>()));
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(a)) if !a.is_empty() => Ok(a),
        Ok(Ok(_)) => Err(format!("cannot resolve {host}: no address")),
        Ok(Err(e)) => Err(format!("cannot resolve {host}: {e}")),
        Err(_) => Err(format!("cannot resolve {host}: no answer from DNS within {}", fmt_duration(timeout))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let p = HttpProxy::parse("http://proxy.corp:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth.as_deref()), ("proxy.corp", 3128, None));
        assert_eq!(HttpProxy::parse("proxy.corp:8080/").unwrap().port, 8080);
        assert_eq!(HttpProxy::parse("http://proxy.corp").unwrap().port, 80);
        let p = HttpProxy::parse("HTTP://al%40ice:p%3Ass@[2001:db8::1]:3128").unwrap();
        assert_eq!((p.host.as_str(), p.port, p.auth.as_deref()), ("2001:db8::1", 3128, Some("al@ice:p:ss")));
        let q = HttpProxy::parse("http://proxy.corp:3128").unwrap().with_auth("bob:pa:ss\n").unwrap();
        assert_eq!(q.auth.as_deref(), Some("bob:pa:ss"));
        assert!(HttpProxy::parse("http://proxy.corp:3128").unwrap().with_auth("nopassword").is_err());
        assert_eq!(p.display(), "http://al@ice:***@[2001:db8::1]:3128");
        for bad in ["https://p:3128", "socks5://p:1080", "http://:3128", "http://p:99999", "http://p:0", "http://p:3128/path"] {
            assert!(HttpProxy::parse(bad).is_err(), "{bad}");
        }
        // The password never shows in an error.
        let e = HttpProxy::parse("https://u:secret@p:3128").unwrap_err();
        assert!(!e.contains("secret") && e.contains("u:***@"), "{e}");
    }

    #[test]
    fn environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| move |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string());
        assert_eq!(HttpProxy::from_env("turn.example.com", env(&[])), None);
        let p = HttpProxy::from_env("turn.example.com", env(&[("https_proxy", "http://a:1"), ("ALL_PROXY", "http://b:2")]));
        assert_eq!(p.unwrap().unwrap().host, "a");
        let p = HttpProxy::from_env("turn.example.com", env(&[("HTTPS_PROXY", " "), ("all_proxy", "http://b:2")]));
        assert_eq!(p.unwrap().unwrap().host, "b");
        let no = env(&[("HTTPS_PROXY", "http://a:1"), ("NO_PROXY", "localhost, .example.com")]);
        assert_eq!(HttpProxy::from_env("turn.example.com", no), None);
        assert!(HttpProxy::from_env("turn.example.org", no).is_some());
        let e = HttpProxy::from_env("x", env(&[("HTTPS_PROXY", "socks5://a:1")])).unwrap().unwrap_err();
        assert!(e.starts_with("HTTPS_PROXY: "), "{e}");
    }

    /// A one-connection stand-in proxy on loopback: reads the request
    /// header, sends `answer`, then echoes what follows. Returns its address
    /// and, once done, the request it read.
    fn fake_proxy(answer: &'static [u8]) -> (u16, std::thread::JoinHandle<String>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = std::thread::spawn(move || {
            let (mut c, _) = l.accept().unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut head = Vec::new();
            let mut b = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).unwrap_or(0) == 1 {
                head.push(b[0]);
            }
            c.write_all(answer).unwrap();
            let mut buf = [0u8; 64];
            if let Ok(n) = c.read(&mut buf) {
                let _ = c.write_all(&buf[..n]);
            }
            String::from_utf8_lossy(&head).into_owned()
        });
        (port, t)
    }

    #[test]
    fn connect_tunnels_on_200() {
        let (port, t) = fake_proxy(b"HTTP/1.1 200 Connection established\r\nX: y\r\n\r\n");
        let p = HttpProxy::parse(&format!("http://al%40ice:pw@127.0.0.1:{port}")).unwrap();
        let mut s = p.connect("2001:db8::1", 443, Duration::from_secs(5)).unwrap();
        s.write_all(b"ping").unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"ping");
        let req = t.join().unwrap();
        assert!(req.starts_with("CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"), "{req}");
        // base64("al@ice:pw")
        assert!(req.contains("Proxy-Authorization: Basic YWxAaWNlOnB3\r\n"), "{req}");
    }

    #[test]
    fn connect_reports_refusals_and_non_proxies() {
        let (port, t) = fake_proxy(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
        let p = HttpProxy::parse(&format!("127.0.0.1:{port}")).unwrap();
        match p.connect("turn.example.com", 3478, Duration::from_secs(5)) {
            Err(Error::ProxyRefused { status: 403, target, reason, .. }) => {
                assert_eq!((target.as_str(), reason.as_str()), ("turn.example.com:3478", "Forbidden"));
            }
            other => panic!("{other:?}"),
        }
        assert!(!t.join().unwrap().contains("Proxy-Authorization"));
        let (port, t) = fake_proxy(b"SSH-2.0-OpenSSH_9.2\r\n\r\n");
        let p = HttpProxy::parse(&format!("127.0.0.1:{port}")).unwrap();
        let e = p.connect("turn.example.com", 443, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&e, Error::Proxy(d) if d.contains("not an HTTP proxy")), "{e:?}");
        t.join().unwrap();
        // Nothing listening: refused, said as a proxy problem.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let p = HttpProxy::parse(&format!("127.0.0.1:{port}")).unwrap();
        let e = p.connect("turn.example.com", 443, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(&e, Error::Proxy(d) if d.contains("cannot connect")), "{e:?}");
    }

    #[test]
    fn no_proxy_lists() {
        assert!(no_proxy_covers("*", "anything"));
        assert!(no_proxy_covers("example.com", "turn.example.com"));
        assert!(no_proxy_covers("*.example.com", "turn.example.com"));
        assert!(no_proxy_covers("Example.COM", "example.com"));
        assert!(!no_proxy_covers("example.com", "badexample.com"));
        assert!(no_proxy_covers("198.51.100.0/24", "198.51.100.7"));
        assert!(!no_proxy_covers("198.51.100.0/24", "198.51.101.7"));
        assert!(no_proxy_covers("198.51.100.7", "198.51.100.7"));
        assert!(no_proxy_covers("[2001:db8::1]", "2001:db8::1"));
        assert!(no_proxy_covers("2001:db8::/32", "[2001:db8::5]"));
        assert!(!no_proxy_covers("", "example.com"));
    }
}
