//! spotguard-sim: a deterministic fleet simulation that runs the project's
//! real agent (`Runner`, state machine, job code) and controller (handler,
//! reconciler) against a simulated AWS in virtual time, as TigerBeetle's
//! VOPR and FoundationDB's simulation run theirs.
//!
//! - [`scenario`]: the scenario file.
//! - [`world`]: the simulated Auto Scaling, spot capacity and billing.
//! - [`apis`]: the agent's `Fleet` and the controller's `Cloud` over it.
//! - [`run`]: one run of a policy; invariants and figures.
//! - [`report`]: the table, `summary.json` and `report.html`.
//! - [`cli`]: `spotguard-sim run` and `sweep`.

pub mod apis;
pub mod cli;
pub mod report;
pub mod run;
pub mod scenario;
pub mod world;
