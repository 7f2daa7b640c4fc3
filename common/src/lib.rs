//! Code the spotguard binaries truly share: the shapes of the instance
//! metadata the agent reads and the mock serves (so both sides agree on one
//! definition of every body), the configuration duration type and error
//! chain, the clock decisions read, and the region of a queue URL or ARN;
//! with `rt`, how each binary starts (log, runtime, signals); with `aws`,
//! the SNS publish both binaries make and the two EC2 tag calls of the
//! agents' liveness mark; with `http`, the one HTTP/1 accept
//! loop.

pub mod clock;
pub mod config;
#[cfg(feature = "aws")]
pub mod ec2;
#[cfg(feature = "http")]
pub mod http;
pub mod imds;
pub mod region;
#[cfg(feature = "rt")]
pub mod rt;
#[cfg(feature = "aws")]
pub mod sns;
