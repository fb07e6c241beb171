//! HTTP/1.1 for the check page ([`crate::check`]): on a TLS listener when
//! the browser negotiates ALPN `http/1.1`, and on `check.http_listen`.
//! hyper parses and frames; [`crate::check::Site`] decides every answer.
//! A connection lives at most [`LIFETIME`]; headers must arrive within the
//! handshake timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::check::Site;

/// The ALPN protocol browsers get the check page with.
pub const ALPN: &[u8] = b"http/1.1";
/// The longest an HTTP connection stays open (keep-alive included).
const LIFETIME: Duration = Duration::from_secs(60);

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Serves one connection until it closes or [`LIFETIME`] ends.
pub async fn serve<S>(io: S, client: SocketAddr, site: Arc<Site>, not_ready: impl Fn() -> Option<String> + 'static, header_timeout: Duration)
where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let host = req.headers().get(hyper::header::HOST).and_then(|h| h.to_str().ok()).or_else(|| req.uri().host());
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let why = if req.uri().path() == "/readyz" { not_ready() } else { None };
        let a = site.handle(req.method().as_str(), target, host, client.ip(), unix_now(), why.as_deref());
        let mut r = Response::builder()
            .status(a.status)
            .header(hyper::header::CONTENT_TYPE, a.content_type)
            .header(hyper::header::CACHE_CONTROL, "no-store")
            .header("X-Content-Type-Options", "nosniff")
            .header("Referrer-Policy", "no-referrer")
            // The page runs inline script and style and talks to nothing
            // but this origin (and the report URL of tests, on loopback).
            .header(
                "Content-Security-Policy",
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' http://127.0.0.1:*; frame-ancestors 'none'",
            );
        if let Some(l) = &a.location {
            r = r.header(hyper::header::LOCATION, l.as_str());
        }
        if let Some(s) = a.retry_after {
            r = r.header(hyper::header::RETRY_AFTER, s.to_string());
        }
        let resp = r.body(Full::new(Bytes::from(a.body))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())));
        async move { Ok::<_, Infallible>(resp) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(io), svc);
    if let Ok(Err(e)) = tokio::time::timeout(LIFETIME, conn).await {
        tracing::debug!(%client, error = %e, "check page connection ended");
    }
}
