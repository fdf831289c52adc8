//! Token buckets: pure arithmetic on a 16-byte state, and the compare-and-swap loop that
//! keeps one bucket exact across Envoy's worker threads.
//!
//! Tokens are counted in nano-tokens and refill is rounded down, so rounding can only
//! ever admit less than the configured rate, never more.
//!
//! Busy keys on large plans do not pay a shared-data round trip per request: a worker
//! takes several tokens at once (a lease, see [`take_leased`]) and spends them locally.
//! Every token still comes out of the one shared bucket, so all workers together never
//! admit more than the plan allows.

use std::collections::HashMap;

const NANOS_PER_TOKEN: u128 = 1_000_000_000;
const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// A refill rate and a capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per `period_ns`.
    pub requests: u64,
    /// Length of the period, in nanoseconds.
    pub period_ns: u64,
    /// Bucket capacity in tokens.
    pub burst: u64,
}

/// The whole state of one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens held, in nano-tokens.
    pub nanotokens: u64,
    /// Host time of the last update, nanoseconds since the Unix epoch.
    pub updated_ns: u64,
}

/// What one attempt to take a token found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// A token was taken.
    pub admitted: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Seconds until one token is available (0 when one is), rounded up.
    pub retry_after_s: u64,
    /// Seconds until the bucket is full again, rounded up.
    pub reset_s: u64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(rate: &Rate, now_ns: u64) -> Bucket {
        Bucket {
            nanotokens: capacity(rate),
            updated_ns: now_ns,
        }
    }

    /// The bucket refilled up to `now`; a clock that steps back refills nothing.
    pub fn refilled(self, rate: &Rate, now_ns: u64) -> Bucket {
        let elapsed = now_ns.saturating_sub(self.updated_ns);
        let added = u128::from(elapsed)
            .saturating_mul(u128::from(rate.requests))
            .saturating_mul(NANOS_PER_TOKEN)
            / u128::from(rate.period_ns.max(1));
        let cap = capacity(rate);
        Bucket {
            nanotokens: u64::try_from(
                u128::from(self.nanotokens)
                    .saturating_add(added)
                    .min(u128::from(cap)),
            )
            .unwrap_or(cap),
            updated_ns: self.updated_ns.max(now_ns),
        }
    }

    /// Takes `cost` tokens if the bucket holds them; returns the new state and verdict.
    pub fn take(self, rate: &Rate, now_ns: u64, cost: u64) -> (Bucket, Verdict) {
        let mut b = self.refilled(rate, now_ns);
        let cost_nt = u128::from(cost).saturating_mul(NANOS_PER_TOKEN);
        let admitted = u128::from(b.nanotokens) >= cost_nt;
        if admitted {
            b.nanotokens -= u64::try_from(cost_nt).unwrap_or(b.nanotokens);
        }
        (b, b.verdict(rate, admitted))
    }

    /// Takes as many whole tokens as the bucket holds, up to `most` (at least 1); returns
    /// the new state, the verdict and the number taken (0 when refused).
    pub fn take_up_to(self, rate: &Rate, now_ns: u64, most: u64) -> (Bucket, Verdict, u64) {
        let mut b = self.refilled(rate, now_ns);
        let per_token = NANOS_PER_TOKEN as u64;
        let taken = (b.nanotokens / per_token).min(most.max(1));
        b.nanotokens -= taken * per_token;
        (b, b.verdict(rate, taken > 0), taken)
    }

    /// One token given back (by a request another bucket refused), never beyond capacity.
    pub fn give_back(self, rate: &Rate, now_ns: u64) -> Bucket {
        let mut b = self.refilled(rate, now_ns);
        let cap = capacity(rate);
        b.nanotokens = b.nanotokens.saturating_add(NANOS_PER_TOKEN as u64).min(cap);
        b
    }

    /// The verdict for the current state without taking anything.
    pub fn peek(self, rate: &Rate, now_ns: u64) -> Verdict {
        let b = self.refilled(rate, now_ns);
        b.verdict(rate, u128::from(b.nanotokens) >= NANOS_PER_TOKEN)
    }

    fn verdict(&self, rate: &Rate, admitted: bool) -> Verdict {
        let held = u128::from(self.nanotokens);
        let until = |target: u128| -> u64 {
            let missing = target.saturating_sub(held);
            // Nanoseconds until `missing` nano-tokens have been added, rounded up.
            let per_ns_num = u128::from(rate.requests).saturating_mul(NANOS_PER_TOKEN);
            let ns = missing
                .saturating_mul(u128::from(rate.period_ns))
                .div_ceil(per_ns_num.max(1));
            u64::try_from(ns.div_ceil(u128::from(NANOS_PER_SECOND))).unwrap_or(u64::MAX)
        };
        let retry = until(NANOS_PER_TOKEN);
        Verdict {
            admitted,
            remaining: u64::try_from(held / NANOS_PER_TOKEN).unwrap_or(u64::MAX),
            retry_after_s: if admitted { 0 } else { retry.max(1) },
            reset_s: until(u128::from(capacity(rate))),
        }
    }

    /// 16 bytes: nano-tokens then update time, little-endian.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.nanotokens.to_le_bytes());
        out[8..].copy_from_slice(&self.updated_ns.to_le_bytes());
        out
    }

    /// Reads the 16-byte form; `None` for anything else.
    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        let tokens: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let time: [u8; 8] = bytes.get(8..16)?.try_into().ok()?;
        if bytes.len() != 16 {
            return None;
        }
        Some(Bucket {
            nanotokens: u64::from_le_bytes(tokens),
            updated_ns: u64::from_le_bytes(time),
        })
    }
}

fn capacity(rate: &Rate) -> u64 {
    u64::try_from(u128::from(rate.burst).saturating_mul(NANOS_PER_TOKEN)).unwrap_or(u64::MAX)
}

/// Shared storage with compare-and-swap, as proxy-wasm shared data provides.
pub trait Store {
    /// The value and its version, or `None` if the key was never set.
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes the value if the stored version is still `version` (0: unconditionally).
    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError>;
}

/// Why a store operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreError {
    /// Someone else wrote first; read again.
    Conflict,
    /// The host refused the operation.
    Host(u32),
}

/// Version passed when creating a bucket. Hosts number versions from 1 upwards, one per
/// write across all keys, so an existing entry holds this value only after about 4e9
/// writes and only by coincidence; that is the one case in which creation can race.
const CREATE_VERSION: u32 = u32::MAX;

/// Attempts per request before giving up on a contended bucket.
pub const MAX_ATTEMPTS: usize = 32;

/// Why a bucket could not be consulted; the request must then be refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitError {
    /// Every attempt lost the compare-and-swap race.
    Contended,
    /// The store failed.
    Store(u32),
}

/// Takes `cost` tokens from the bucket stored under `key`, exactly once across all
/// workers: read, compute, write back only if nobody wrote in between; else retry.
pub fn take<S: Store + ?Sized>(
    store: &S,
    key: &str,
    rate: &Rate,
    now_ns: u64,
    cost: u64,
) -> Result<Verdict, LimitError> {
    update(store, key, rate, now_ns, |bucket| {
        let (next, verdict) = bucket.take(rate, now_ns, cost);
        (next, verdict, 0)
    })
    .map(|(verdict, _)| verdict)
}

/// Applies `step` to the bucket under `key` exactly once across all workers: read,
/// compute, write back only if nobody wrote in between; else retry.
fn update<S: Store + ?Sized>(
    store: &S,
    key: &str,
    rate: &Rate,
    now_ns: u64,
    step: impl Fn(Bucket) -> (Bucket, Verdict, u64),
) -> Result<(Verdict, u64), LimitError> {
    for _ in 0..MAX_ATTEMPTS {
        let (bucket, version) = current(store, key, rate, now_ns)?;
        let (next, verdict, taken) = step(bucket);
        if next == bucket && version != 0 {
            // Nothing changed (refused, no refill): no write needed.
            return Ok((verdict, taken));
        }
        // A bucket seen absent is created with a version no live entry is expected to
        // hold: the host then creates it if it is still absent, and reports a conflict
        // if another worker created it first (a version of 0 would overwrite that).
        let version = if version == 0 {
            CREATE_VERSION
        } else {
            version
        };
        match store.set(key, &next.encode(), version) {
            Ok(()) => return Ok((verdict, taken)),
            Err(StoreError::Conflict) => continue,
            Err(StoreError::Host(s)) => return Err(LimitError::Store(s)),
        }
    }
    Err(LimitError::Contended)
}

/// How long a worker may hold tokens it took ahead; unused ones are then dropped (they
/// were taken from the shared bucket, so dropping them can only admit less).
pub const LEASE_TTL_NS: u64 = NANOS_PER_SECOND;

/// Most tokens a worker takes ahead at once.
pub const MAX_LEASE: u64 = 256;

/// A lease is at most this fraction of the bucket, so the tokens workers hold ahead stay
/// a small part of it: plans with a burst under 128 are always taken from one at a time.
pub const BURST_PER_LEASE: u64 = 64;

/// Buckets one worker holds leases on at most; beyond that, tokens are taken singly.
pub const MAX_LEASES: usize = 4096;

/// Tokens one worker has taken ahead from a shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Lease {
    /// Taken and not yet spent.
    tokens: u64,
    /// Taken the last time.
    size: u64,
    /// When they were taken.
    taken_ns: u64,
    /// The shared bucket's whole tokens and seconds to full just after they were taken.
    shared_remaining: u64,
    reset_s: u64,
}

impl Lease {
    fn fresh(&self, now_ns: u64) -> bool {
        now_ns >= self.taken_ns && now_ns - self.taken_ns < LEASE_TTL_NS
    }
}

/// One worker's leases, by bucket name (one per Wasm VM; never shared).
#[derive(Debug, Default)]
pub struct Leases {
    held: HashMap<String, Lease>,
}

impl Leases {
    /// Drops every lease (on a new configuration: plans may have changed).
    pub fn clear(&mut self) {
        self.held.clear();
    }

    /// Number of buckets with a lease.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no lease is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }
}

/// The largest lease for a rate; below 2, tokens are taken one request at a time.
pub fn max_lease(rate: &Rate) -> u64 {
    (rate.burst / BURST_PER_LEASE).min(MAX_LEASE)
}

/// Takes one token for a request, from this worker's lease on the bucket when it holds
/// one, else from the shared bucket under `key`. A worker whose lease ran out while fresh
/// takes twice as many the next time (up to [`max_lease`]); one whose lease expired with
/// tokens left takes half as many: a key used now and then takes one token at a time,
/// exactly as [`take`] does. `remaining` in the verdict counts the worker's unspent tokens
/// as still in the bucket.
pub fn take_leased<S: Store + ?Sized>(
    store: &S,
    leases: &mut Leases,
    key: &str,
    rate: &Rate,
    now_ns: u64,
) -> Result<Verdict, LimitError> {
    let most = max_lease(rate);
    if most < 2 {
        return take(store, key, rate, now_ns, 1);
    }
    let size = match leases.held.get_mut(key) {
        Some(lease) => {
            let fresh = lease.fresh(now_ns);
            if fresh && lease.tokens > 0 {
                lease.tokens -= 1;
                return Ok(Verdict {
                    admitted: true,
                    remaining: lease.shared_remaining.saturating_add(lease.tokens),
                    retry_after_s: 0,
                    reset_s: lease.reset_s,
                });
            }
            let next = if fresh {
                lease.size.saturating_mul(2)
            } else if lease.tokens > 0 {
                lease.size / 2
            } else {
                lease.size
            };
            next.clamp(1, most)
        }
        None => {
            if leases.held.len() >= MAX_LEASES {
                leases.held.retain(|_, l| l.fresh(now_ns));
            }
            if leases.held.len() >= MAX_LEASES {
                return take(store, key, rate, now_ns, 1);
            }
            1
        }
    };
    let (verdict, taken) = update(store, key, rate, now_ns, |bucket| {
        bucket.take_up_to(rate, now_ns, size)
    })?;
    if !verdict.admitted {
        leases.held.remove(key);
        return Ok(verdict);
    }
    let lease = Lease {
        tokens: taken - 1,
        size,
        taken_ns: now_ns,
        shared_remaining: verdict.remaining,
        reset_s: verdict.reset_s,
    };
    leases.held.insert(key.to_string(), lease);
    Ok(Verdict {
        remaining: verdict.remaining.saturating_add(lease.tokens),
        ..verdict
    })
}

/// What one request found in each of its plan's buckets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdicts {
    /// A token was taken from every bucket (else from none).
    pub admitted: bool,
    /// Each bucket's state after the request, in the plan's order. When refused: the
    /// buckets that refused (`admitted: false`, with their time until a token), the
    /// others as they stand.
    pub each: Vec<Verdict>,
}

impl Verdicts {
    /// Seconds until every bucket holds a token again (0 when admitted).
    pub fn retry_after_s(&self) -> u64 {
        self.each.iter().map(|v| v.retry_after_s).max().unwrap_or(0)
    }
}

/// Takes one token from each of several buckets (`buckets[i]` at `rates[i]`, a plan with
/// several rates), or none: a request needs a token from every bucket.
///
/// Each bucket is taken from in turn by the compare-and-swap loop of [`take`]; when one
/// refuses (or fails), the tokens already taken are given back, each by the same loop, and
/// the buckets not reached are only read (for `Retry-After`). Every admitted request thus
/// holds a token of every bucket, so no bucket ever admits more than its own rate allows,
/// whatever the interleaving of workers. What races remain only ever refuse more: a request
/// that looks at a bucket between another's take and give-back finds one token fewer than
/// there will be, and a give-back that cannot be written (contention beyond
/// [`MAX_ATTEMPTS`], a host failure) loses that token (the bucket refills as usual).
/// No leases: every token comes straight from the shared bucket.
pub fn take_each<S: Store + ?Sized>(
    store: &S,
    buckets: &[&str],
    rates: &[Rate],
    now_ns: u64,
) -> Result<Verdicts, LimitError> {
    let mut each: Vec<Verdict> = Vec::with_capacity(rates.len());
    for (i, (key, rate)) in buckets.iter().zip(rates).enumerate() {
        let outcome = take(store, key, rate, now_ns, 1);
        if let Ok(v) = outcome {
            if v.admitted {
                each.push(v);
                continue;
            }
        }
        // Refused or failed here: give back what the earlier buckets gave.
        for (key, rate) in buckets[..i].iter().zip(rates) {
            let _ = update(store, key, rate, now_ns, |bucket| {
                let next = bucket.give_back(rate, now_ns);
                (next, next.peek(rate, now_ns), 0)
            });
        }
        let refused = outcome?;
        let mut each: Vec<Verdict> = Vec::with_capacity(rates.len());
        for (j, (key, rate)) in buckets.iter().zip(rates).enumerate() {
            if j == i {
                each.push(refused);
                continue;
            }
            let v = peek(store, key, rate, now_ns)?;
            // A bucket that holds a token would not refuse; one that holds none would too.
            each.push(v);
        }
        return Ok(Verdicts {
            admitted: false,
            each,
        });
    }
    Ok(Verdicts {
        admitted: true,
        each,
    })
}

/// The verdict for the bucket under `key` without taking a token.
pub fn peek<S: Store + ?Sized>(
    store: &S,
    key: &str,
    rate: &Rate,
    now_ns: u64,
) -> Result<Verdict, LimitError> {
    let (bucket, _) = current(store, key, rate, now_ns)?;
    Ok(bucket.peek(rate, now_ns))
}

fn current<S: Store + ?Sized>(
    store: &S,
    key: &str,
    rate: &Rate,
    now_ns: u64,
) -> Result<(Bucket, u32), LimitError> {
    match store.get(key) {
        Ok(Some((bytes, version))) => Ok((
            Bucket::decode(&bytes).unwrap_or_else(|| Bucket::full(rate, now_ns)),
            version,
        )),
        // Never used: a full bucket, created by the first write.
        Ok(None) => Ok((Bucket::full(rate, now_ns), 0)),
        Err(StoreError::Conflict) => Err(LimitError::Contended),
        Err(StoreError::Host(s)) => Err(LimitError::Store(s)),
    }
}

/// An in-process [`Store`], for tests and offline tools.
#[derive(Debug, Default)]
pub struct MemoryStore {
    values: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
    version: std::cell::Cell<u32>,
}

impl Store for MemoryStore {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.values.borrow().get(key).cloned())
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        let mut values = self.values.borrow_mut();
        if version != 0 && values.get(key).is_some_and(|(_, v)| *v != version) {
            return Err(StoreError::Conflict);
        }
        self.version.set(self.version.get().wrapping_add(1).max(1));
        values.insert(key.to_string(), (value.to_vec(), self.version.get()));
        Ok(())
    }
}

impl MemoryStore {
    /// Number of keys stored.
    pub fn len(&self) -> usize {
        self.values.borrow().len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.values.borrow().is_empty()
    }
}

#[cfg(test)]
mod tests;
