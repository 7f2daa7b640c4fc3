//! Instance metadata: the IMDSv2 client. The body types and parsers live in
//! `spotguard-common` because the mock IMDS serves the same shapes.

mod client;

pub use client::{
    ImdsClient, ImdsConfig, ImdsError, ImdsStats, ImdsStatsSnapshot, DEFAULT_ENDPOINT,
};
pub use spotguard_common::imds::*;
