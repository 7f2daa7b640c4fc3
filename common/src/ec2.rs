//! The two EC2 calls spotguard makes, `CreateTags` and `DescribeTags`,
//! signed by hand (SigV4 through `aws-sigv4`, the SDK's own signer) and sent
//! over the SDK's TLS stack (hyper-rustls, aws-lc-rs): `aws-sdk-ec2` costs
//! 5 minutes and 8 GiB to build (BUILD-NOTES.md) for two calls of EC2's
//! Query API, a form-encoded POST answered in XML.
//!
//! They carry the agents' liveness mark: a busy agent writes the tag
//! [`ALIVE_TAG`] on its own instance (the Unix time, in seconds) whenever
//! it sets or re-asserts its scale-in protection, and the controller reads
//! the marks of the protected instances of its groups to release only the
//! instances whose agent stopped writing (README: "A dead agent, not a busy
//! one"). Tagging is free and needs no per-instance metric (a CloudWatch
//! metric per instance would cost about $0.30 a month each, and reading
//! them every minute more).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};

/// The instance tag holding a busy agent's last liveness mark.
pub const ALIVE_TAG: &str = "spotguard:alive";

/// EC2's Query API version (the one every current SDK speaks).
const VERSION: &str = "2016-11-15";

/// Resource ids per `DescribeTags` filter. AWS's API reference states no
/// limit on a filter's values, but EC2 has been seen refusing more than
/// 200 (`FilterLimitExceeded`; Apache Druid's EC2 autoscaler keeps to it
/// too): 200 a call stays within it.
pub const IDS_PER_FILTER: usize = 200;

/// Attempts per call: throttling (`RequestLimitExceeded`, HTTP 503), a 5xx
/// or a broken connection is tried again after 0.5 s and 1 s, as the SDK's
/// standard retry mode does (3 attempts). The caller bounds the whole.
const ATTEMPTS: u32 = 3;

/// A failed EC2 call: AWS's error code and message, or what went wrong on
/// the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ec2Error {
    pub code: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Ec2Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(c) => write!(f, "{c}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl Ec2Error {
    fn other(message: impl Into<String>) -> Ec2Error {
        Ec2Error {
            code: None,
            message: message.into(),
        }
    }

    fn retryable(&self, status: Option<u16>) -> bool {
        status.is_none_or(|s| s >= 500)
            || matches!(
                self.code.as_deref(),
                Some("RequestLimitExceeded" | "Throttling" | "InternalError" | "Unavailable")
            )
    }
}

/// An EC2 client for one region.
#[derive(Clone)]
pub struct Ec2 {
    region: String,
    endpoint: String,
    credentials: SharedCredentialsProvider,
    http: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Ec2 {
    /// `endpoint`: the SDK configuration's endpoint URL (`AWS_ENDPOINT_URL`,
    /// a local AWS), else EC2's regional endpoint.
    pub fn new(
        credentials: SharedCredentialsProvider,
        region: &str,
        endpoint: Option<&str>,
    ) -> Result<Ec2, String> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("cannot load the system's TLS root certificates: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(hyper_util::rt::TokioExecutor::new()).build(https);
        let endpoint = match endpoint {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => regional_endpoint(region),
        };
        Ok(Ec2 {
            region: region.to_string(),
            endpoint,
            credentials,
            http,
        })
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// `CreateTags` of one tag on one resource (AWS: a value of at most 256
    /// characters; an existing key's value is replaced).
    pub async fn create_tag(&self, resource: &str, key: &str, value: &str) -> Result<(), Ec2Error> {
        let params = [
            ("Action", "CreateTags"),
            ("ResourceId.1", resource),
            ("Tag.1.Key", key),
            ("Tag.1.Value", value),
        ];
        self.call(&params).await.map(|_| ())
    }

    /// `DescribeTags` of `key` on the given instances: their values, by
    /// instance id. Ids go 200 to a filter, pages of 1,000 are followed.
    pub async fn tag_values(
        &self,
        key: &str,
        instances: &[String],
    ) -> Result<Vec<(String, String)>, Ec2Error> {
        let mut out = Vec::new();
        for batch in instances.chunks(IDS_PER_FILTER) {
            let mut token: Option<String> = None;
            loop {
                let mut params: Vec<(String, String)> = vec![
                    ("Action".into(), "DescribeTags".into()),
                    ("MaxResults".into(), "1000".into()),
                    ("Filter.1.Name".into(), "key".into()),
                    ("Filter.1.Value.1".into(), key.into()),
                    ("Filter.2.Name".into(), "resource-id".into()),
                ];
                for (i, id) in batch.iter().enumerate() {
                    params.push((format!("Filter.2.Value.{}", i + 1), id.clone()));
                }
                if let Some(t) = &token {
                    params.push(("NextToken".into(), t.clone()));
                }
                let refs: Vec<(&str, &str)> = params
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect();
                let body = self.call(&refs).await?;
                let (tags, next) = parse_tag_set(&body);
                out.extend(
                    tags.into_iter()
                        .filter(|t| t.key == key)
                        .map(|t| (t.resource, t.value)),
                );
                match next {
                    Some(n) if token.as_deref() != Some(n.as_str()) => token = Some(n),
                    _ => break,
                }
            }
        }
        Ok(out)
    }

    async fn call(&self, params: &[(&str, &str)]) -> Result<String, Ec2Error> {
        let mut wait = Duration::from_millis(500);
        let mut attempt = 1;
        loop {
            match self.call_once(params).await {
                Ok(body) => return Ok(body),
                Err((e, status)) if attempt < ATTEMPTS && e.retryable(status) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    async fn call_once(&self, params: &[(&str, &str)]) -> Result<String, (Ec2Error, Option<u16>)> {
        let body = form(params.iter().copied().chain([("Version", VERSION)]));
        let url = format!("{}/", self.endpoint);
        let creds = self.credentials.provide_credentials().await.map_err(|e| {
            (
                Ec2Error::other(format!("no AWS credentials: {e}")),
                Some(400),
            )
        })?;
        let identity = creds.into();
        let settings = aws_sigv4::http_request::SigningSettings::default();
        let signing = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| (Ec2Error::other(format!("cannot sign: {e}")), Some(400)))?
            .into();
        const CONTENT_TYPE: &str = "application/x-www-form-urlencoded; charset=utf-8";
        let headers = [("content-type", CONTENT_TYPE)];
        let signable = aws_sigv4::http_request::SignableRequest::new(
            "POST",
            &url,
            headers.iter().copied(),
            aws_sigv4::http_request::SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| (Ec2Error::other(format!("cannot sign: {e}")), Some(400)))?;
        let (instructions, _) = aws_sigv4::http_request::sign(signable, &signing)
            .map_err(|e| (Ec2Error::other(format!("cannot sign: {e}")), Some(400)))?
            .into_parts();
        let mut req = http::Request::builder()
            .method("POST")
            .uri(&url)
            .header("content-type", CONTENT_TYPE)
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| (Ec2Error::other(format!("bad request: {e}")), Some(400)))?;
        instructions.apply_to_request_http1x(&mut req);
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| (Ec2Error::other(format!("{url}: {e}")), None))?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| (Ec2Error::other(format!("{url}: {e}")), None))?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if (200..300).contains(&status) {
            Ok(text)
        } else {
            Err((parse_error(status, &text), Some(status)))
        }
    }
}

/// EC2's endpoint in `region`: `amazonaws.com.cn` in the China regions
/// (AWS: "The endpoint domain for both the Beijing and Ningxia Regions is
/// amazonaws.com.cn"), `amazonaws.com` elsewhere. FIPS endpoints are not
/// chosen by themselves: set `AWS_ENDPOINT_URL_EC2`.
pub fn regional_endpoint(region: &str) -> String {
    if region.starts_with("cn-") {
        format!("https://ec2.{region}.amazonaws.com.cn")
    } else {
        format!("https://ec2.{region}.amazonaws.com")
    }
}

/// The endpoint to use instead of EC2's own, as the SDK would choose it:
/// `AWS_ENDPOINT_URL_EC2`, else the configuration's endpoint for every
/// service (`AWS_ENDPOINT_URL`, a local AWS).
pub fn endpoint_override(all_services: Option<&str>) -> Option<String> {
    std::env::var("AWS_ENDPOINT_URL_EC2")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| all_services.map(str::to_string))
}

/// `application/x-www-form-urlencoded`, as the Query API reads it.
fn form<'a>(params: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (k, v) in params {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(&encode(k));
        out.push('=');
        out.push_str(&encode(v));
    }
    out
}

fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One item of a `DescribeTags` answer's `tagSet`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub resource: String,
    pub key: String,
    pub value: String,
}

/// The items of a `DescribeTags` answer and its `nextToken`. An item
/// missing its `resourceId` or `key` is skipped; a missing or empty
/// `value` (`<value/>`) is "".
pub fn parse_tag_set(xml: &str) -> (Vec<Tag>, Option<String>) {
    let Some(set) = element(xml, "tagSet") else {
        return (Vec::new(), element(xml, "nextToken").map(unescape));
    };
    let mut tags = Vec::new();
    let mut rest = set;
    while let Some(start) = rest.find("<item>") {
        let after = &rest[start + "<item>".len()..];
        let Some(end) = after.find("</item>") else {
            break;
        };
        let item = &after[..end];
        if let (Some(resource), Some(key)) = (element(item, "resourceId"), element(item, "key")) {
            tags.push(Tag {
                resource: unescape(resource),
                key: unescape(key),
                value: element(item, "value").map(unescape).unwrap_or_default(),
            });
        }
        rest = &after[end + "</item>".len()..];
    }
    // The token follows the set; one inside an item is not the answer's.
    let tail = &xml[xml.find("</tagSet>").map_or(0, |i| i + "</tagSet>".len())..];
    (
        tags,
        element(tail, "nextToken")
            .map(unescape)
            .filter(|t| !t.is_empty()),
    )
}

/// EC2's error answer: `<Response><Errors><Error><Code>..</Code>
/// <Message>..</Message></Error></Errors>..</Response>`; anything else is
/// reported with its HTTP status and its first 200 characters.
pub fn parse_error(status: u16, xml: &str) -> Ec2Error {
    match (element(xml, "Code"), element(xml, "Message")) {
        (Some(code), message) => Ec2Error {
            code: Some(unescape(code)),
            message: message.map(unescape).unwrap_or_default(),
        },
        (None, _) => Ec2Error::other(format!(
            "HTTP {status}: {}",
            xml.chars().take(200).collect::<String>().replace('\n', " ")
        )),
    }
}

/// The text of the first `<name>...</name>` (`<name/>` is empty).
fn element<'a>(xml: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let empty = format!("<{name}/>");
    let close = format!("</{name}>");
    let o = xml.find(&open);
    let e = xml.find(&empty);
    match (o, e) {
        (Some(o), e) if e.is_none_or(|e| o < e) => {
            let from = o + open.len();
            xml[from..].find(&close).map(|len| &xml[from..from + len])
        }
        (_, Some(_)) => Some(""),
        _ => None,
    }
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&#xD;", "\r")
        .replace("&#xA;", "\n")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's `DescribeTags` example answer (EC2 API reference), with an
    /// empty value and a token.
    const ANSWER: &str = r#"<DescribeTagsResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
   <requestId>7a62c49f-347e-4fc4-9331-6e8eEXAMPLE</requestId>
   <tagSet>
      <item>
         <resourceId>i-1234567890abcdef0</resourceId>
         <resourceType>instance</resourceType>
         <key>spotguard:alive</key>
         <value>1764950400</value>
      </item>
      <item>
         <resourceId>i-0598c7d356eba48d7</resourceId>
         <resourceType>instance</resourceType>
         <key>spotguard:alive</key>
         <value/>
      </item>
      <item>
         <resourceId>i-0aaaaaaaaaaaaaaaa</resourceId>
         <resourceType>instance</resourceType>
         <key>a&amp;b</key>
         <value>x&lt;y</value>
      </item>
   </tagSet>
   <nextToken>abc&amp;1</nextToken>
</DescribeTagsResponse>"#;

    #[test]
    fn a_describe_tags_answer_reads_as_ec2_writes_it() {
        let (tags, next) = parse_tag_set(ANSWER);
        assert_eq!(
            tags,
            vec![
                Tag {
                    resource: "i-1234567890abcdef0".into(),
                    key: "spotguard:alive".into(),
                    value: "1764950400".into()
                },
                Tag {
                    resource: "i-0598c7d356eba48d7".into(),
                    key: "spotguard:alive".into(),
                    value: "".into()
                },
                Tag {
                    resource: "i-0aaaaaaaaaaaaaaaa".into(),
                    key: "a&b".into(),
                    value: "x<y".into()
                },
            ]
        );
        assert_eq!(next.as_deref(), Some("abc&1"));
        let (none, last) =
            parse_tag_set("<DescribeTagsResponse><tagSet/><nextToken/></DescribeTagsResponse>");
        assert!(none.is_empty());
        assert_eq!(last, None);
    }

    #[test]
    fn an_ec2_error_names_its_code_and_message() {
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<Response><Errors><Error><Code>UnauthorizedOperation</Code><Message>You are not authorized to perform this operation.</Message></Error></Errors><RequestID>b1d3</RequestID></Response>"#;
        let e = parse_error(403, xml);
        assert_eq!(e.code.as_deref(), Some("UnauthorizedOperation"));
        assert_eq!(
            e.to_string(),
            "UnauthorizedOperation: You are not authorized to perform this operation."
        );
        assert!(!e.retryable(Some(403)));
        let t = parse_error(503, "<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message></Error></Errors></Response>");
        assert!(t.retryable(Some(503)));
        let odd = parse_error(502, "<html>Bad Gateway</html>");
        assert_eq!(odd.to_string(), "HTTP 502: <html>Bad Gateway</html>");
        assert!(odd.retryable(Some(502)));
    }

    #[test]
    fn the_china_regions_have_their_own_domain() {
        assert_eq!(
            regional_endpoint("cn-north-1"),
            "https://ec2.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            regional_endpoint("us-east-2"),
            "https://ec2.us-east-2.amazonaws.com"
        );
    }

    #[test]
    fn the_form_encodes_as_sigv4_expects() {
        assert_eq!(
            form(
                [
                    ("Tag.1.Key", "spotguard:alive"),
                    ("Filter.1.Value.1", "a b/c~")
                ]
                .into_iter()
            ),
            "Tag.1.Key=spotguard%3Aalive&Filter.1.Value.1=a%20b%2Fc~"
        );
    }
}
