//! The one SNS call both binaries make: a notice, or a mode change, to a
//! topic. Each caller bounds it and maps the error into its own, naming the
//! topic and region.

use aws_sdk_sns::error::SdkError;
use aws_sdk_sns::operation::publish::PublishError;

/// Publishes `message` with `subject` to `topic`. The client must be in the
/// topic's region ([`crate::region::arn_region`]).
pub async fn publish(
    client: &aws_sdk_sns::Client,
    topic: &str,
    subject: &str,
    message: &str,
) -> Result<(), SdkError<PublishError>> {
    client
        .publish()
        .topic_arn(topic)
        .subject(subject)
        .message(message)
        .send()
        .await
        .map(|_| ())
}
