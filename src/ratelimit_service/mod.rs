//! `keygate-ratelimit`: Envoy's `envoy.service.ratelimit.v3.RateLimitService`, with every
//! counter in Redis, so any number of Envoys and service replicas share one count per key.
//!
//! Envoy's `envoy.filters.http.ratelimit` filter (after keygate) sends, in domain
//! [`decide::DOMAIN`], a descriptor with the entries `plan` and `key_id` that keygate set
//! (`x-keygate-plan`, `x-keygate-key-id`). The plan's limit comes from the key store, as
//! the filter computes it ([`plans`]); the bucket is the filter's own token bucket (capacity
//! `burst`, refilled at `requests` per `per`), kept in Redis as a GCRA theoretical arrival
//! time and taken from atomically by one Lua script ([`gcra`]).
//!
//! - [`plans`]: the store's plans, compiled by the filter's own code.
//! - [`decide`]: pure: descriptors to buckets, Redis replies to the gRPC response.
//! - [`gcra`]: the Lua script and the Redis client.
//! - [`watch`]: reloads the plans when the store file changes.
//! - [`server`]: the gRPC service, command-line options and logging.

pub mod decide;
pub mod gcra;
pub mod logging;
pub mod plans;
pub mod server;
pub mod watch;

pub use server::{run, serve, Options};
