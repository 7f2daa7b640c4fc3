//! The one HTTP/1 accept loop: the agent's status endpoint, the mock IMDS
//! and the test harness's servers all serve through it, each with its own
//! request handler, until their shutdown future completes (as mini-redis's
//! `run(listener, shutdown)`).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A response with its whole body.
pub type Reply = Response<Full<Bytes>>;

/// Bounds on what peers can hold. Anyone on the instance, a job included,
/// can connect to the status endpoint: without them, idle or half-sent
/// connections each hold a task and a socket for ever, until the agent
/// runs out of file descriptors (and so of SQS connections).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// A peer that has not sent a whole request head by then is dropped
    /// (hyper's `header_read_timeout`; the status endpoint's scrapers send
    /// theirs at once).
    pub header_read_timeout: Duration,
    /// A connection is closed after this long whatever it does: the head
    /// timeout runs only while a head is read, and a peer that pipelines
    /// requests and never reads the answers holds its slot otherwise.
    /// `None`: no bound (test servers whose requests last as long as a job).
    pub max_connection_time: Option<Duration>,
}

impl Limits {
    /// For an endpoint anyone on the instance can reach (the agent's
    /// status): one request per connection, 30 s at most each (a scrape
    /// answers in milliseconds).
    pub fn exposed() -> Limits {
        Limits {
            max_connection_time: Some(Duration::from_secs(30)),
            ..Limits::default()
        }
    }
}

impl Default for Limits {
    /// 64 connections: a Prometheus scraper, a health check and a person
    /// need a few; 10 s for a request head on loopback is generous.
    fn default() -> Self {
        Limits {
            max_connections: 64,
            header_read_timeout: Duration::from_secs(10),
            max_connection_time: None,
        }
    }
}

/// Serves each connection on its own task, `handle` for each request, until
/// `shutdown` completes (connections already open finish on their own). A
/// handler's `Err` drops the connection without an answer (fault
/// injection). An accept error (EMFILE, say) is logged and serving goes
/// on after a short pause, rather than the server dying. Within the default
/// [`Limits`].
pub async fn serve<H, F, E>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    handle: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    serve_within(listener, shutdown, handle, Limits::default()).await
}

/// [`serve`] within `limits`.
pub async fn serve_within<H, F, E>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    handle: H,
    limits: Limits,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
        };
        let stream = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(handle);
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .keep_alive(limits.max_connection_time.is_none())
                .serve_connection(TokioIo::new(stream), service);
            let ended = match limits.max_connection_time {
                Some(t) => match tokio::time::timeout(t, conn).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::debug!("connection held too long; closed");
                        return;
                    }
                },
                None => conn.await,
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
}

/// A reply with `status`, `content_type` and `body`.
pub fn reply(status: u16, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = hyper::header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// The whole body of a request (empty if the peer broke off).
pub async fn body_bytes(body: Incoming) -> Bytes {
    body.collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_never_reads_its_answers_is_closed_on_an_exposed_endpoint() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve_within(
            listener,
            std::future::pending(),
            |_req: Request<Incoming>| async {
                Ok::<_, std::io::Error>(reply(200, "text/plain", "x".repeat(64 * 1024)))
            },
            Limits {
                max_connections: 1,
                max_connection_time: Some(Duration::from_millis(500)),
                ..Limits::exposed()
            },
        ));
        // Pipelined requests, answers never read: hyper blocks writing.
        let mut hog = tokio::net::TcpStream::connect(addr).await.unwrap();
        let many = "GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(200);
        let _ =
            tokio::time::timeout(Duration::from_millis(300), hog.write_all(many.as_bytes())).await;
        // The slot comes back within the connection's bound.
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), next.read_to_end(&mut out))
            .await
            .expect("served once the hog was closed")
            .unwrap();
        assert!(out.starts_with(b"HTTP/1.1 200"));
        drop(hog);
    }

    #[tokio::test]
    async fn a_silent_peer_is_dropped_and_connections_past_the_cap_wait() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 1,
            header_read_timeout: Duration::from_millis(300),
            max_connection_time: None,
        };
        tokio::spawn(serve_within(
            listener,
            std::future::pending(),
            |_req: Request<Incoming>| async {
                Ok::<_, std::io::Error>(reply(200, "text/plain", "ok"))
            },
            limits,
        ));
        // A peer that sends half a request head holds the one slot ...
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        let waited =
            tokio::time::timeout(Duration::from_millis(150), next.read_to_string(&mut out)).await;
        assert!(waited.is_err(), "served past the cap: {out:?}");
        // ... until the head's timeout drops it; then the next is served.
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(3), silent.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the silent peer was never dropped");
        tokio::time::timeout(Duration::from_secs(3), next.read_to_string(&mut out))
            .await
            .expect("served once the slot was free")
            .unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("ok"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn serves_until_shutdown_and_a_handler_error_drops_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            async {
                let _ = stopped.await;
            },
            |req: Request<Incoming>| async move {
                let path = req.uri().path().to_string();
                if path == "/drop" {
                    return Err(std::io::Error::other("dropped"));
                }
                let n = body_bytes(req.into_body()).await.len();
                Ok(reply(200, "text/plain", format!("{path} {n}")))
            },
        ));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out).await;
            out
        };
        let ok = get("/a").await;
        assert!(
            ok.starts_with("HTTP/1.1 200") && ok.ends_with("/a 3"),
            "{ok}"
        );
        assert_eq!(get("/drop").await, "");
        stop.send(()).unwrap();
        server.await.unwrap().unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "closed"
        );
    }
}
