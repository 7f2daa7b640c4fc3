//! Code the spotguard binaries truly share: the shapes of the instance
//! metadata the agent reads and the mock serves (so both sides agree on one
//! definition of every body), and the configuration duration type and error
//! chain the agent and the controller both use.

pub mod config;
pub mod imds;
