//! keygate: API-key authentication at the edge, as an Envoy proxy-wasm HTTP filter.
//!
//! Every decision is made by plain Rust in the modules below, tested natively; only
//! `filter` (built for wasm32 alone) talks to the proxy-wasm host.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

pub mod config;
pub mod credentials;
pub mod decision;
#[cfg(not(target_arch = "wasm32"))]
pub mod doctor;
pub mod failedauth;
#[cfg(not(target_arch = "wasm32"))]
pub mod fleet;
pub mod ip;
pub mod keys;
pub mod logbudget;
pub mod metrics;
pub mod path;
pub mod ratelimit;
#[cfg(not(target_arch = "wasm32"))]
pub mod ratelimit_service;
#[cfg(not(target_arch = "wasm32"))]
pub mod store;
pub mod time;
#[cfg(not(target_arch = "wasm32"))]
pub mod usage;
#[cfg(not(target_arch = "wasm32"))]
pub mod wasm_module;
pub mod wire;

#[cfg(target_arch = "wasm32")]
mod filter;
