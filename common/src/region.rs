//! Which region an AWS resource lives in, from its URL or ARN. A queue and
//! a topic live in one region, and a client must be in that region
//! (REFERENCE.md, SQS): a fallback-region instance that asked its own
//! region's endpoint for the primary queue would get `QueueDoesNotExist`.

/// The region of an SQS queue URL, for the forms AWS documents:
/// `https://sqs.<region>.amazonaws.com/<account>/<name>` (also
/// `.amazonaws.com.cn` in China and the GovCloud regions), the legacy
/// `https://<region>.queue.amazonaws.com/<account>/<name>`, and the
/// legacy `https://queue.amazonaws.com/...`, which is us-east-1. Returns
/// `None` for any other host (a VPC endpoint's DNS name, a local
/// stand-in): the configuration must then name the region.
pub fn queue_url_region(url: &str) -> Option<String> {
    let url = url.trim().to_ascii_lowercase();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', ':']).next()?;
    let host = host
        .strip_suffix(".amazonaws.com")
        .or_else(|| host.strip_suffix(".amazonaws.com.cn"))?;
    if host == "queue" {
        return Some("us-east-1".into());
    }
    let region = match host.strip_prefix("sqs.") {
        Some(r) => r,
        None => host.strip_suffix(".queue")?,
    };
    is_region(region).then(|| region.to_string())
}

/// The region of an ARN (`arn:<partition>:<service>:<region>:<account>:<resource>`).
pub fn arn_region(arn: &str) -> Option<String> {
    let mut parts = arn.splitn(6, ':');
    if parts.next()? != "arn" {
        return None;
    }
    let region = parts.nth(2)?;
    is_region(region).then(|| region.to_string())
}

/// `us-east-1`, `cn-north-1`, `us-gov-west-1`, `ap-southeast-5`: letters
/// and digits in dash-separated words ending in a number.
pub fn is_region(s: &str) -> bool {
    let words: Vec<&str> = s.split('-').collect();
    words.len() >= 3
        && words.iter().all(|w| {
            !w.is_empty()
                && w.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && words
            .last()
            .is_some_and(|w| w.bytes().all(|b| b.is_ascii_digit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_urls_of_every_documented_form() {
        for (url, want) in [
            (
                "https://sqs.us-east-1.amazonaws.com/123456789012/jobs",
                Some("us-east-1"),
            ),
            (
                "https://sqs.us-east-2.amazonaws.com/123456789012/jobs.fifo",
                Some("us-east-2"),
            ),
            (
                "https://eu-west-1.queue.amazonaws.com/123456789012/jobs",
                Some("eu-west-1"),
            ),
            (
                "https://queue.amazonaws.com/123456789012/jobs",
                Some("us-east-1"),
            ),
            (
                "https://sqs.cn-north-1.amazonaws.com.cn/123456789012/jobs",
                Some("cn-north-1"),
            ),
            (
                "https://sqs.us-gov-west-1.amazonaws.com/123456789012/jobs",
                Some("us-gov-west-1"),
            ),
            (
                "HTTPS://SQS.AP-SOUTHEAST-2.AMAZONAWS.COM/1/q",
                Some("ap-southeast-2"),
            ),
            // No region in the host: the configuration must say it.
            (
                "https://vpce-0a1b-abc.sqs.us-east-1.vpce.amazonaws.com/1/q",
                None,
            ),
            ("http://127.0.0.1:5000/123456789012/jobs", None),
            ("https://sqs.amazonaws.com/1/q", None),
            ("not a url", None),
            ("https://sqs.evil.amazonaws.com.example.org/1/q", None),
        ] {
            assert_eq!(queue_url_region(url).as_deref(), want, "{url}");
        }
    }

    #[test]
    fn arns() {
        assert_eq!(
            arn_region("arn:aws:sns:us-east-1:123456789012:spotguard").as_deref(),
            Some("us-east-1")
        );
        assert_eq!(
            arn_region("arn:aws-cn:sns:cn-north-1:123456789012:t").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(arn_region("arn:aws:sns::123456789012:t"), None);
        assert_eq!(arn_region("sns:us-east-1"), None);
        assert!(!is_region("useast1"));
        assert!(!is_region("us-east-x"));
    }
}
