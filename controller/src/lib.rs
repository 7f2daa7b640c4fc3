//! spotguard-controller. Not built yet: the backlog metric, the failover
//! reconciler and the Lambda/loop front-ends are tracked in issue 4. This
//! crate exists so the workspace layout is final; the binary says so and
//! fails rather than pretending to work.

/// What the binary prints until the controller exists.
pub const NOT_BUILT: &str =
    "spotguard-controller is not built yet (metric publishing and failover are tracked in issue 4)";
