//! Code the spotguard binaries truly share: the shapes of the instance
//! metadata the agent reads and the mock serves, so that both sides agree on
//! one definition of every body.

pub mod imds;
