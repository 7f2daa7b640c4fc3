//! Minimal blocking HTTP/1.1 client over std for the mock's control API, so
//! the harness needs no async runtime. One request per connection.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Clone, Default)]
pub struct Client;

pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Client {
    pub fn request(&self, method: &str, url: &str, body: &str) -> Response {
        let rest = url.strip_prefix("http://").expect("http:// URL");
        let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let path = if path.is_empty() { "/" } else { path };
        let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("write request");
        let mut raw = String::new();
        s.read_to_string(&mut raw).expect("read response");
        let status = raw
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad response: {raw}"));
        let body = raw
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Response { status, body }
    }
}
