//! How the harness's test servers (the http worker, the fault proxy, the
//! checkpointing app, the Lambda runtime API) serve: the project's one
//! accept loop (`spotguard_common::http::serve`), on an ephemeral loopback
//! port, in the background of the test's runtime, for the test's life.

use std::future::Future;
use std::net::SocketAddr;

pub use hyper::body::Incoming;
pub use hyper::Request;
pub use spotguard_common::http::{body_bytes, reply, Reply};

/// Binds 127.0.0.1:0 and serves `handle` there on `rt`; returns the address.
pub fn spawn<H, F, E>(rt: &tokio::runtime::Runtime, handle: H) -> SocketAddr
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Reply, E>> + Send + 'static,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
{
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind a loopback port");
    let addr = listener.local_addr().expect("bound address");
    rt.spawn(spotguard_common::http::serve(
        listener,
        std::future::pending(),
        handle,
    ));
    addr
}
