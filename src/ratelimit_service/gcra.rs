//! The token bucket in Redis, as GCRA: one Lua script takes from a bucket atomically.
//!
//! A bucket of capacity `burst` refilled at `requests` per `period` is, in time, an
//! emission interval `T = period / requests` per token and a tolerance of `burst * T`.
//! Redis keeps one number per bucket, its theoretical arrival time (TAT, microseconds since
//! the Unix epoch): the instant at which the bucket will be full again. A missing key is a
//! full bucket. A request of `cost` tokens at time `now`:
//!
//! - `tat = max(stored TAT, now)`, and at most `now + burst * T` (so a clock stepped back
//!   or a plan made smaller leaves an empty bucket, never a longer wait than empty);
//! - `new_tat = tat + cost * T`; admitted iff `new_tat - now <= burst * T` (plus 1 µs for
//!   floating-point rounding, so a request is never admitted more than 1 µs before the
//!   filter's local bucket would admit it); if admitted the key is set to `new_tat`, with
//!   an expiry (PX) at the instant the bucket is full again, so idle keys vanish;
//!   a refused request changes nothing;
//! - remaining = whole tokens in the bucket afterwards, `floor((burst*T - (tat' - now)) / T)`;
//!   reset = ms until full, `ceil((tat' - now) / 1000)`; retry = ms until the refused
//!   request's tokens (at most `burst`) are there, rounded up, 0 when admitted.
//!
//! `now` is Redis's `TIME`, read inside the script, so replicas with skewed clocks agree.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, Script};

use super::decide::{Bucket, Reply};

/// The GCRA take from all the buckets of one plan (one per rate), run atomically by Redis:
/// every bucket is checked first, and the cost is taken from all of them only if every
/// one admits it; otherwise nothing is written. `KEYS` are the buckets; `ARGV[1]` is the
/// cost, then for each bucket its period in microseconds, `requests` and `burst`. Answers
/// `{admitted (0/1), remaining, reset_ms, retry_ms}` for each bucket in turn; when the
/// request is refused, `admitted` is 1 for the buckets that would have admitted it (their
/// state is as before), and 0 with `retry_ms` for those that did not.
pub const SCRIPT: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local n = #KEYS
local cost = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local slack = 1
local all = true
local state = {}
for i = 1, n do
  local period_us = tonumber(ARGV[3 * i - 1])
  local requests = tonumber(ARGV[3 * i])
  local burst = tonumber(ARGV[3 * i + 1])
  local interval = period_us / requests
  local capacity = burst * interval
  local tat = now
  local stored = redis.call('GET', KEYS[i])
  if stored then tat = tonumber(stored) or now end
  if tat < now then tat = now end
  if tat > now + capacity then tat = now + capacity end
  local new_tat = tat + cost * interval
  local fits = new_tat - now <= capacity + slack
  if not fits then all = false end
  state[i] = {interval, capacity, burst, tat, new_tat, fits}
end
local out = {}
for i = 1, n do
  local interval, capacity, burst, tat, new_tat, fits = unpack(state[i])
  local admitted = 0
  local after = tat
  local retry_ms = 0
  if all then
    admitted = 1
    after = new_tat
    local ttl = math.ceil((new_tat - now) / 1000)
    if ttl < 1 then ttl = 1 end
    redis.call('SET', KEYS[i], string.format('%.3f', new_tat), 'PX', ttl)
  elseif fits then
    admitted = 1
  else
    local wanted = tat + math.min(cost, burst) * interval - capacity - now
    retry_ms = math.ceil(wanted / 1000)
    if retry_ms < 1 then retry_ms = 1 end
  end
  local used = after - now
  if used < 0 then used = 0 end
  local remaining = math.floor((capacity + slack - used) / interval)
  if remaining < 0 then remaining = 0 end
  if remaining > burst then remaining = burst end
  out[4 * i - 3] = admitted
  out[4 * i - 2] = remaining
  out[4 * i - 1] = math.ceil(used / 1000)
  out[4 * i] = retry_ms
end
return out
"#;

/// Why a take did not get an answer.
#[derive(Debug)]
pub enum TakeError {
    /// No answer within the timeout.
    Timeout,
    /// Redis failed or is unreachable.
    Redis(redis::RedisError),
    /// Redis answered something the script never returns.
    Reply(String),
}

impl std::fmt::Display for TakeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TakeError::Timeout => f.write_str("Redis did not answer in time"),
            TakeError::Redis(e) => write!(f, "Redis: {e}"),
            TakeError::Reply(e) => write!(f, "Redis: unexpected answer: {e}"),
        }
    }
}

/// Takes from buckets in one Redis (or anything that speaks its protocol), reconnecting by
/// itself when the connection is lost.
#[derive(Clone)]
pub struct Limiter {
    connection: ConnectionManager,
    script: Script,
    timeout: Duration,
}

impl Limiter {
    /// A limiter for the Redis at `url`; connects lazily (a Redis that is down now is
    /// tried again on later requests). Every take is answered within `timeout`.
    /// Needs a Tokio runtime.
    pub fn new(url: &str, timeout: Duration) -> redis::RedisResult<Limiter> {
        let client = Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            // Each attempt fails fast on a refused connection; a black-holed one gives up
            // after a second, and the next request starts another.
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(4)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500))
            // The take's own deadline bounds each command.
            .set_response_timeout(None);
        Ok(Limiter {
            connection: ConnectionManager::new_lazy_with_config(client, config)?,
            script: Script::new(SCRIPT),
            timeout,
        })
    }

    /// The time a take may wait for Redis.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Takes `bucket.cost` tokens from each of the plan's buckets, or none (EVALSHA, EVAL
    /// when Redis lacks the script); one reply per bucket.
    pub async fn take(&self, bucket: &Bucket) -> Result<Vec<Reply>, TakeError> {
        let mut connection = self.connection.clone();
        let mut invocation = self.script.prepare_invoke();
        for key in &bucket.keys {
            invocation.key(key);
        }
        invocation.arg(bucket.cost);
        for rate in bucket.rates() {
            invocation
                .arg(rate.period_ns / 1000)
                .arg(rate.requests)
                .arg(rate.burst);
        }
        let values: Vec<i64> = invocation
            .invoke_async(&mut connection)
            .await
            .map_err(TakeError::Redis)?;
        Reply::from_all(&values, bucket.keys.len()).map_err(TakeError::Reply)
    }

    /// [`Limiter::take`] for each bucket in turn, all within one timeout.
    pub async fn take_all(&self, buckets: &[&Bucket]) -> Result<Vec<Vec<Reply>>, TakeError> {
        let all = async {
            let mut replies = Vec::with_capacity(buckets.len());
            for bucket in buckets {
                replies.push(self.take(bucket).await?);
            }
            Ok(replies)
        };
        match tokio::time::timeout(self.timeout, all).await {
            Ok(result) => result,
            Err(_) => Err(TakeError::Timeout),
        }
    }
}
