//! The observability HTTP listener (`metrics.listen`): `/metrics`, `/healthz`, `/readyz`; and
//! the small HTTP client `rewardpool top` reads `/metrics` with.
//!
//! hyper 1 (HTTP/1.1 only), bounded on every side a scraper or an attacker controls:
//! at most [`CONNECTIONS_MAX`] connections (more are closed at once), request heads of at
//! most [`REQUEST_HEAD_BYTES_MAX`], [`HEADER_READ_TIMEOUT`] to send a request head, and
//! [`CONNECTION_LIFETIME_MAX`] for a whole connection. Bodies are never read.

use crate::metrics::{Metrics, Readiness};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Connections served at once; more are closed on accept.
pub const CONNECTIONS_MAX: usize = 64;
/// Largest request head (hyper's read buffer; its minimum is 8 KiB).
pub const REQUEST_HEAD_BYTES_MAX: usize = 8192;
/// Time a client has to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection (keep-alive included).
pub const CONNECTION_LIFETIME_MAX: Duration = Duration::from_secs(60);
/// Largest `/metrics` body the client reads.
pub const CLIENT_BODY_BYTES_MAX: usize = 64 << 20;

/// Binds `metrics.listen`; the error names the key and the address.
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| {
        anyhow::anyhow!(
            "metrics.listen = {listen:?}: cannot listen for HTTP (/metrics, /healthz, /readyz): {e}"
        )
    })
}

/// Serves until the returned task is aborted.
pub fn serve(listener: TcpListener, metrics: Arc<Metrics>) -> JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    tokio::spawn(async move {
        loop {
            let (stream, _peer) = match listener.accept().await {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, std::convert::Infallible>(respond(&req, &metrics)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(REQUEST_HEAD_BYTES_MAX)
                    .serve_connection(TokioIo::new(stream), service);
                let _ = tokio::time::timeout(CONNECTION_LIFETIME_MAX, conn).await;
                drop(slot);
            });
        }
    })
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

fn respond(req: &Request<Incoming>, metrics: &Metrics) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        "/healthz" => {
            if metrics.storage_failed() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN,
                    "storage failed\n".into(),
                )
            } else {
                text(StatusCode::OK, PLAIN, "ok\n".into())
            }
        }
        "/readyz" => {
            let r = metrics.readiness();
            let status = if r == Readiness::Ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, format!("{}\n", r.reason()))
        }
        _ => text(
            StatusCode::NOT_FOUND,
            PLAIN,
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// `host:port` and path of an `http://host:port/path` URL (the scheme is optional).
pub fn split_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    if rest.contains("://") {
        anyhow::bail!("{url:?}: only http:// URLs are supported");
    }
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() {
        anyhow::bail!("{url:?}: no host:port");
    }
    Ok((authority.to_owned(), path.to_owned()))
}

/// One HTTP/1.1 GET: status and body (at most [`CLIENT_BODY_BYTES_MAX`]), within `timeout`.
pub async fn http_get(url: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let (authority, path) = split_url(url)?;
    let get = async {
        let addr: Vec<SocketAddr> = tokio::net::lookup_host(&authority).await?.collect();
        let addr = addr
            .first()
            .ok_or_else(|| anyhow::anyhow!("{authority}: no address"))?;
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let driver = tokio::spawn(conn);
        let req = Request::builder()
            .uri(&path)
            .header("host", &authority)
            .body(http_body_util::Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = Limited::new(resp.into_body(), CLIENT_BODY_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        driver.abort();
        Ok::<_, anyhow::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    match tokio::time::timeout(timeout, get).await {
        Ok(r) => r.map_err(|e| anyhow::anyhow!("GET {url}: {e}")),
        Err(_) => anyhow::bail!("GET {url}: no answer within {timeout:?}"),
    }
}
