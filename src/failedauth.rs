//! The failed-authentication limit: exact client addresses in a bounded shared table.
//!
//! Each client address that failed to authenticate has its own token bucket (every 401
//! takes a token; an empty bucket means 429 before the key is even looked at). Buckets
//! are kept for exact addresses, never for hashes of them, so an address is only ever
//! refused for its own failures.
//!
//! Memory is bounded because shared-data keys are never freed: the table is
//! set-associative, [`SETS`] shared-data keys (`keygate:failed:<set>`) of [`WAYS`]
//! entries each, every value exactly [`SET_BYTES`] long. An address belongs to one set
//! (a hash of its canonical 16-byte form). When a set is full, a new failing address
//! evicts the entry whose bucket holds the most tokens (the address with the fewest
//! recent failures; ties: the least recently updated), so a flood of one-failure
//! addresses evicts its own members and not an address close to lockout. An evicted
//! address starts over with a full bucket: eviction only ever forgives.
//!
//! The hash is fixed and public, so an attacker can choose addresses that land in one
//! set. That buys nothing against anybody else: the only effect of any eviction is that
//! some address is forgiven, and `check` refuses an address only when the table holds
//! that exact address with an empty bucket. The address forgiven is the entry with the
//! most tokens, so forgiving an address with `n` failures first takes every other entry
//! of its set having at least `n` failures of its own.
//!
//! Set value layout, version [`FORMAT`]:
//!
//! ```text
//! byte 0            format version (1)
//! then WAYS ways    ENTRY_BYTES each:
//!   byte 0          1 = in use, 0 = empty (an empty way is all zeros)
//!   bytes 1..17     the address, IPv6 form (IPv4 as IPv4-mapped ::ffff:a.b.c.d)
//!   bytes 17..33    the bucket, as ratelimit::Bucket::encode writes it
//! ```
//!
//! A value of another length or version reads as an empty set, as does an absent key; a
//! way with another flag reads as empty, and a second way holding an address already seen
//! in the set is ignored.

use std::net::IpAddr;

use crate::ip;
use crate::ratelimit::{Bucket, LimitError, Rate, Store, StoreError, Verdict, MAX_ATTEMPTS};

/// Number of sets (shared-data keys); a power of two.
pub const SETS: usize = 1024;

/// Entries (addresses) per set.
pub const WAYS: usize = 8;

/// Shared-data name prefix of the sets; the set index follows in decimal.
pub const PREFIX: &str = "keygate:failed:";

/// Format version, the first byte of every set value.
pub const FORMAT: u8 = 1;

/// Bytes per way: flag, address, bucket.
pub const ENTRY_BYTES: usize = 1 + 16 + 16;

/// Bytes of every set value.
pub const SET_BYTES: usize = 1 + WAYS * ENTRY_BYTES;

/// Flag of a way in use.
const USED: u8 = 1;

/// Version passed when creating a set: the host then creates the key if it is still
/// absent and reports a conflict if another worker created it first (the same value and
/// reasoning as the token buckets in `ratelimit`).
const CREATE_VERSION: u32 = u32::MAX;

/// Mixed into the hash so that sets do not line up with any other FNV use of addresses.
/// Not a secret: see the module documentation for why it need not be one.
const HASH_SEED: u64 = 0x6b65_7967_6174_6531; // "keygate1"

const _: () = assert!(SETS.is_power_of_two());

/// One address and its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    addr: [u8; 16],
    bucket: Bucket,
}

type Ways = [Option<Entry>; WAYS];

/// Before the key is looked at: whether the address is locked out. `admitted` false means
/// refuse, with `Retry-After: retry_after_s`. An address not in the table is admitted and
/// nothing is written.
pub fn check<S: Store + ?Sized>(
    store: &S,
    addr: IpAddr,
    rate: &Rate,
    now_ns: u64,
) -> Result<Verdict, LimitError> {
    let addr = octets(addr);
    let (ways, _, _) = read(store, &set_key(set_of(&addr)))?;
    Ok(match ways.iter().flatten().find(|e| e.addr == addr) {
        Some(entry) => entry.bucket.peek(rate, now_ns),
        None => absent(rate, now_ns),
    })
}

/// After a 401: takes one token from the address's bucket, inserting the address if it is
/// absent (evicting the entry with the most tokens when its set is full), exactly once
/// across all workers: read the set, compute, write back only if nobody wrote in between;
/// else retry, up to [`MAX_ATTEMPTS`] times.
pub fn record_failure<S: Store + ?Sized>(
    store: &S,
    addr: IpAddr,
    rate: &Rate,
    now_ns: u64,
) -> Result<Verdict, LimitError> {
    let addr = octets(addr);
    let key = set_key(set_of(&addr));
    for _ in 0..MAX_ATTEMPTS {
        let (ways, version, stored) = read(store, &key)?;
        let (next, verdict, changed) = with_failure(ways, &addr, rate, now_ns);
        if !changed && version != 0 {
            return Ok(verdict);
        }
        let bytes = encode(&next);
        if version != 0 && stored.as_deref() == Some(&bytes[..]) {
            return Ok(verdict);
        }
        let version = if version == 0 {
            CREATE_VERSION
        } else {
            version
        };
        match store.set(&key, &bytes, version) {
            Ok(()) => return Ok(verdict),
            Err(StoreError::Conflict) => continue,
            Err(StoreError::Host(s)) => return Err(LimitError::Store(s)),
        }
    }
    Err(LimitError::Contended)
}

/// The shared-data key of the set an address belongs to.
pub fn key_for(addr: IpAddr) -> String {
    set_key(set_of(&octets(addr)))
}

fn set_key(set: usize) -> String {
    format!("{PREFIX}{set}")
}

/// The canonical 16-byte form: IPv4 and IPv4-mapped IPv6 are the same address.
fn octets(addr: IpAddr) -> [u8; 16] {
    match ip::canonical(addr) {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// FNV-1a of the seed and the address, then the SplitMix64 finaliser so that every bit of
/// the address reaches the low bits the set index is taken from.
fn set_of(addr: &[u8; 16]) -> usize {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = FNV_OFFSET;
    for b in HASH_SEED.to_le_bytes().iter().chain(addr.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let mask = (SETS as u64).wrapping_sub(1);
    usize::try_from(h & mask).unwrap_or(0)
}

/// The verdict for an address with no entry: a full bucket, admitted.
fn absent(rate: &Rate, now_ns: u64) -> Verdict {
    Verdict {
        admitted: true,
        retry_after_s: 0,
        ..Bucket::full(rate, now_ns).peek(rate, now_ns)
    }
}

fn find(ways: &Ways, addr: &[u8; 16]) -> Option<usize> {
    ways.iter()
        .position(|w| w.as_ref().is_some_and(|e| &e.addr == addr))
}

/// The set after one failure of `addr`, the verdict of its take, and whether anything
/// worth writing changed (a refused take of a present address changes nothing).
fn with_failure(
    mut ways: Ways,
    addr: &[u8; 16],
    rate: &Rate,
    now_ns: u64,
) -> (Ways, Verdict, bool) {
    let capacity = Bucket::full(rate, now_ns).nanotokens;
    if let Some(entry) = ways.iter_mut().flatten().find(|e| &e.addr == addr) {
        let (next, verdict) = entry.bucket.take(rate, now_ns, 1);
        if !verdict.admitted {
            return (ways, verdict, false);
        }
        entry.bucket = next;
        free_full(&mut ways, rate, now_ns, capacity);
        return (ways, verdict, true);
    }
    // Entries that have refilled to full carry no failures: their ways are free.
    free_full(&mut ways, rate, now_ns, capacity);
    let (bucket, verdict) = Bucket::full(rate, now_ns).take(rate, now_ns, 1);
    if bucket.nanotokens >= capacity {
        // Nothing was taken (no capacity at all): nothing to remember.
        return (ways, verdict, true);
    }
    let slot = ways
        .iter()
        .position(Option::is_none)
        .or_else(|| victim(&ways, rate, now_ns));
    if let Some(way) = slot.and_then(|i| ways.get_mut(i)) {
        *way = Some(Entry {
            addr: *addr,
            bucket,
        });
    }
    (ways, verdict, true)
}

/// Empties the ways whose bucket has refilled to full.
fn free_full(ways: &mut Ways, rate: &Rate, now_ns: u64, capacity: u64) {
    for way in ways.iter_mut() {
        if way
            .as_ref()
            .is_some_and(|e| e.bucket.refilled(rate, now_ns).nanotokens >= capacity)
        {
            *way = None;
        }
    }
}

/// The way to evict from a full set: the most tokens once refilled to now (the fewest
/// recent failures); among equals the least recently updated, then the lowest way.
fn victim(ways: &Ways, rate: &Rate, now_ns: u64) -> Option<usize> {
    ways.iter()
        .enumerate()
        .filter_map(|(i, w)| w.as_ref().map(|e| (i, e)))
        .max_by_key(|(i, e)| {
            (
                e.bucket.refilled(rate, now_ns).nanotokens,
                std::cmp::Reverse(e.bucket.updated_ns),
                std::cmp::Reverse(*i),
            )
        })
        .map(|(i, _)| i)
}

/// The set under `key`: its ways, its version (0 if absent) and the stored bytes.
fn read<S: Store + ?Sized>(
    store: &S,
    key: &str,
) -> Result<(Ways, u32, Option<Vec<u8>>), LimitError> {
    match store.get(key) {
        Ok(Some((bytes, version))) => Ok((decode(&bytes), version, Some(bytes))),
        Ok(None) => Ok(([None; WAYS], 0, None)),
        Err(StoreError::Conflict) => Err(LimitError::Contended),
        Err(StoreError::Host(s)) => Err(LimitError::Store(s)),
    }
}

fn encode(ways: &Ways) -> Vec<u8> {
    let mut out = Vec::with_capacity(SET_BYTES);
    out.push(FORMAT);
    for way in ways {
        match way {
            Some(e) => {
                out.push(USED);
                out.extend_from_slice(&e.addr);
                out.extend_from_slice(&e.bucket.encode());
            }
            None => out.extend_from_slice(&[0; ENTRY_BYTES]),
        }
    }
    out
}

/// Reads a set value; anything but the expected length and version is an empty set.
fn decode(bytes: &[u8]) -> Ways {
    let mut ways: Ways = [None; WAYS];
    if bytes.len() != SET_BYTES || bytes.first() != Some(&FORMAT) {
        return ways;
    }
    let chunks = bytes.get(1..).unwrap_or_default().chunks_exact(ENTRY_BYTES);
    for (i, chunk) in chunks.enumerate() {
        let Some(entry) = decode_entry(chunk) else {
            continue;
        };
        if find(&ways, &entry.addr).is_some() {
            continue;
        }
        if let Some(way) = ways.get_mut(i) {
            *way = Some(entry);
        }
    }
    ways
}

fn decode_entry(chunk: &[u8]) -> Option<Entry> {
    if chunk.first() != Some(&USED) {
        return None;
    }
    let addr: [u8; 16] = chunk.get(1..17)?.try_into().ok()?;
    let bucket = Bucket::decode(chunk.get(17..ENTRY_BYTES)?)?;
    Some(Entry { addr, bucket })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::cell::{Cell, RefCell};
    use std::collections::{HashMap, HashSet};
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SEC: u64 = 1_000_000_000;
    const T0: u64 = 1_800_000_000 * SEC;

    /// 5 failures, then one more a minute.
    fn rate() -> Rate {
        Rate {
            requests: 1,
            period_ns: 60 * SEC,
            burst: 5,
        }
    }

    /// Shared data as the host keeps it: versions numbered from 1 across all keys; a
    /// write with a version other than 0 fails if the key exists with another version.
    #[derive(Default)]
    struct Mem {
        values: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        version: Cell<u32>,
        /// Writes to refuse with a conflict before honouring any.
        conflicts: Cell<usize>,
        writes: Cell<usize>,
    }

    impl Store for Mem {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Ok(self.values.borrow().get(key).cloned())
        }

        fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
            if self.conflicts.get() > 0 {
                self.conflicts.set(self.conflicts.get() - 1);
                return Err(StoreError::Conflict);
            }
            let mut values = self.values.borrow_mut();
            if version != 0 && values.get(key).is_some_and(|(_, v)| *v != version) {
                return Err(StoreError::Conflict);
            }
            self.version.set(self.version.get().wrapping_add(1).max(1));
            values.insert(key.to_string(), (value.to_vec(), self.version.get()));
            self.writes.set(self.writes.get() + 1);
            Ok(())
        }
    }

    impl Mem {
        fn raw_set(&self, key: &str, value: &[u8]) {
            self.set(key, value, 0).unwrap();
        }
    }

    fn v6(i: u64) -> IpAddr {
        IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8_0000_0001u128 << 64) | u128::from(i),
        ))
    }

    fn v4(i: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | (i & 0x00ff_ffff)))
    }

    /// `n` distinct addresses of one /64 in `set`, skipping `start` candidates.
    fn in_set(set: usize, n: usize, start: u64) -> Vec<IpAddr> {
        (start..)
            .map(v6)
            .filter(|a| set_of(&octets(*a)) == set)
            .take(n)
            .collect()
    }

    fn fail(store: &Mem, addr: IpAddr, times: usize, now: u64) {
        for _ in 0..times {
            record_failure(store, addr, &rate(), now).unwrap();
        }
    }

    fn admitted(store: &impl Store, addr: IpAddr, now: u64) -> bool {
        check(store, addr, &rate(), now).unwrap().admitted
    }

    /// Every stored set, decoded, with its index.
    fn sets(store: &Mem) -> Vec<(String, Vec<u8>, Ways)> {
        store
            .values
            .borrow()
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone(), decode(v)))
            .collect()
    }

    #[test]
    fn locks_out_after_burst_and_recovers_after_refill() {
        let store = Mem::default();
        let a = v4(7);
        assert!(admitted(&store, a, T0));
        assert_eq!(
            store.writes.get(),
            0,
            "checking an unknown address writes nothing"
        );
        for left in (0..5).rev() {
            let v = record_failure(&store, a, &rate(), T0).unwrap();
            assert!(v.admitted);
            assert_eq!(v.remaining, left);
        }
        let v = check(&store, a, &rate(), T0).unwrap();
        assert!(!v.admitted);
        assert_eq!(v.retry_after_s, 60);
        assert!(!admitted(&store, a, T0 + 59 * SEC));
        assert!(admitted(&store, a, T0 + 60 * SEC));
        // One token back: one more failure locks it out again.
        record_failure(&store, a, &rate(), T0 + 60 * SEC).unwrap();
        assert!(!admitted(&store, a, T0 + 60 * SEC));
        // Fully refilled: the way is freed at the next write to the set.
        let later = T0 + 3600 * SEC;
        assert!(admitted(&store, a, later));
        let other = in_set(set_of(&octets(a)), 1, 0)[0];
        record_failure(&store, other, &rate(), later).unwrap();
        let (_, _, ways) = &sets(&store)[0];
        assert_eq!(find(ways, &octets(a)), None);
        assert!(find(ways, &octets(other)).is_some());
    }

    #[test]
    fn refused_failure_of_a_locked_address_writes_nothing() {
        let store = Mem::default();
        let a = v4(8);
        fail(&store, a, 5, T0);
        let writes = store.writes.get();
        let v = record_failure(&store, a, &rate(), T0 + SEC).unwrap();
        assert!(!v.admitted);
        assert_eq!(store.writes.get(), writes);
    }

    #[test]
    fn flood_of_one_failure_addresses_never_refuses_an_innocent_address() {
        let store = Mem::default();
        let innocent: Vec<IpAddr> = (0..200).map(|i| v6(1 << 40 | i)).collect();
        let typo = v4(99); // an honest client that mistyped once
        record_failure(&store, typo, &rate(), T0).unwrap();
        for i in 0..100_000u64 {
            let now = T0 + i * 1_000_000; // 1000 failures a second
            record_failure(&store, v6(i), &rate(), now).unwrap();
            if i % 997 == 0 {
                for a in &innocent {
                    assert!(admitted(&store, *a, now));
                }
                assert!(admitted(&store, typo, now));
            }
        }
        let now = T0 + 100 * SEC;
        assert!(innocent.iter().all(|a| admitted(&store, *a, now)));
        // Each flooding address failed once: none of them is refused either.
        assert!((0..100_000).all(|i| admitted(&store, v6(i), now)));
        assert!(store.values.borrow().len() <= SETS);
    }

    #[test]
    fn address_at_lockout_survives_a_flood_through_its_set() {
        let store = Mem::default();
        let brute = v6(0xdead_beef);
        let set = set_of(&octets(brute));
        let almost = in_set(set, 1, 0)[0]; // one failure left
        fail(&store, brute, 5, T0);
        fail(&store, almost, 4, T0);
        let flood = in_set(set, 3000, 1 << 32);
        for (i, a) in flood.iter().enumerate() {
            let now = T0 + i as u64 * 10_000_000; // 100 a second, 30 s in all
            record_failure(&store, *a, &rate(), now).unwrap();
            assert!(!admitted(&store, brute, now), "evicted after {i}");
            let v = check(&store, almost, &rate(), now).unwrap();
            assert!(v.admitted && v.remaining < 2, "evicted after {i}");
        }
        let (_, _, ways) = &sets(&store)[0];
        assert_eq!(ways.iter().flatten().count(), WAYS);
    }

    #[test]
    fn eviction_takes_the_fullest_then_the_oldest() {
        let rate = rate();
        let addrs = in_set(5, WAYS + 1, 0);
        let store = Mem::default();
        // Way i fails (i % 5) + 1 times, a few nanoseconds apart, later ways earlier.
        for (i, a) in addrs.iter().take(WAYS).enumerate() {
            fail(&store, *a, (i % 5) + 1, T0 + (WAYS - i) as u64);
        }
        // Ways 0 and 5 failed once each and, a second later, have refilled to the same
        // nano-token; 5 was updated earlier, so it goes.
        record_failure(&store, addrs[WAYS], &rate, T0 + SEC).unwrap();
        let (_, _, ways) = &sets(&store)[0];
        assert_eq!(find(ways, &octets(addrs[5])), None);
        assert_eq!(find(ways, &octets(addrs[WAYS])), Some(5));
        assert!((0..WAYS)
            .filter(|i| *i != 5)
            .all(|i| find(ways, &octets(addrs[i])).is_some()));
        // The forgiven address starts over with a full bucket.
        assert_eq!(
            check(&store, addrs[5], &rate, T0 + SEC).unwrap().remaining,
            5
        );
        // Next, way 0 goes: it failed once like the newcomer but has refilled a little
        // since, so it holds the most tokens.
        record_failure(&store, addrs[5], &rate, T0 + SEC).unwrap();
        let (_, _, ways) = &sets(&store)[0];
        assert_eq!(find(ways, &octets(addrs[0])), None);
        assert_eq!(find(ways, &octets(addrs[5])), Some(0));
    }

    #[test]
    fn addresses_never_share_a_budget() {
        let store = Mem::default();
        let pair = in_set(9, 2, 0);
        fail(&store, pair[0], 5, T0);
        assert!(!admitted(&store, pair[0], T0));
        assert!(admitted(&store, pair[1], T0));
        assert_eq!(check(&store, pair[1], &rate(), T0).unwrap().remaining, 5);
        // IPv4 and its IPv4-mapped IPv6 form are one address with one budget.
        let plain: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        fail(&store, plain, 3, T0);
        fail(&store, mapped, 2, T0);
        assert!(!admitted(&store, plain, T0));
        assert!(!admitted(&store, mapped, T0));
        assert_eq!(key_for(plain), key_for(mapped));
        // The neighbour one bit away is untouched.
        assert!(admitted(&store, "192.0.2.0".parse().unwrap(), T0));
    }

    #[test]
    fn memory_is_bounded_whatever_the_addresses() {
        let store = Mem::default();
        for i in 0..50_000u32 {
            record_failure(&store, v4(i.wrapping_mul(2_654_435_761)), &rate(), T0).unwrap();
            record_failure(&store, v6(u64::from(i) << 17), &rate(), T0).unwrap();
        }
        let all = sets(&store);
        assert!(all.len() <= SETS);
        assert!(all.len() > SETS / 2, "addresses spread over the sets");
        for (key, bytes, ways) in &all {
            let index: usize = key.strip_prefix(PREFIX).unwrap().parse().unwrap();
            assert!(index < SETS);
            assert_eq!(bytes.len(), SET_BYTES);
            assert!(ways.iter().flatten().all(|e| set_of(&e.addr) == index));
        }
    }

    /// Another worker records a failure of `other` between each of our reads and writes.
    struct Interfering {
        inner: Mem,
        other: IpAddr,
        times: Cell<usize>,
    }

    impl Store for Interfering {
        fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            let got = self.inner.get(key)?;
            if self.times.get() > 0 {
                self.times.set(self.times.get() - 1);
                record_failure(&self.inner, self.other, &rate(), T0).unwrap();
            }
            Ok(got)
        }

        fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
            self.inner.set(key, value, version)
        }
    }

    #[test]
    fn conflicts_are_retried_and_nothing_is_lost() {
        let pair = in_set(3, 2, 0);
        // The set is absent at first: the other worker's write races our creation too.
        let store = Interfering {
            inner: Mem::default(),
            other: pair[1],
            times: Cell::new(3),
        };
        let v = record_failure(&store, pair[0], &rate(), T0).unwrap();
        assert!(v.admitted);
        assert_eq!(v.remaining, 4);
        let v = check(&store.inner, pair[1], &rate(), T0).unwrap();
        assert_eq!(
            v.remaining, 2,
            "the other worker's three failures all count"
        );
        assert_eq!(
            check(&store.inner, pair[0], &rate(), T0).unwrap().remaining,
            4
        );
    }

    #[test]
    fn bare_conflicts_are_retried_up_to_the_limit() {
        let store = Mem::default();
        store.conflicts.set(MAX_ATTEMPTS - 1);
        let a = v4(1);
        assert!(record_failure(&store, a, &rate(), T0).unwrap().admitted);
        assert_eq!(check(&store, a, &rate(), T0).unwrap().remaining, 4);
        store.conflicts.set(MAX_ATTEMPTS);
        assert_eq!(
            record_failure(&store, a, &rate(), T0),
            Err(LimitError::Contended)
        );
        assert_eq!(check(&store, a, &rate(), T0).unwrap().remaining, 4);
    }

    struct Broken;

    impl Store for Broken {
        fn get(&self, _: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
            Err(StoreError::Host(7))
        }

        fn set(&self, _: &str, _: &[u8], _: u32) -> Result<(), StoreError> {
            Err(StoreError::Host(7))
        }
    }

    #[test]
    fn store_failures_are_reported() {
        let a = v4(1);
        assert_eq!(check(&Broken, a, &rate(), T0), Err(LimitError::Store(7)));
        assert_eq!(
            record_failure(&Broken, a, &rate(), T0),
            Err(LimitError::Store(7))
        );
    }

    #[test]
    fn corrupted_sets_read_as_empty_and_are_repaired() {
        let a = v4(42);
        let key = key_for(a);
        let locked = Mem::default();
        fail(&locked, a, 5, T0);
        let good = locked.get(&key).unwrap().unwrap().0;
        let mut wrong_version = good.clone();
        wrong_version[0] = 2;
        let mut bad_flag = good.clone();
        let way = find(&decode(&good), &octets(a)).unwrap();
        bad_flag[1 + way * ENTRY_BYTES] = 7;
        let mut duplicated = good.clone();
        let other = (way + 1) % WAYS;
        let (src, dst) = (1 + way * ENTRY_BYTES, 1 + other * ENTRY_BYTES);
        duplicated.copy_within(src..src + ENTRY_BYTES, dst);
        for bytes in [
            vec![],
            vec![FORMAT],
            vec![0xff; SET_BYTES],
            good[..SET_BYTES - 1].to_vec(),
            [&good[..], &[0u8][..]].concat(),
            Bucket::full(&rate(), T0).encode().to_vec(), // a slot of the old layout
            wrong_version,
            bad_flag,
        ] {
            let store = Mem::default();
            store.raw_set(&key, &bytes);
            assert!(admitted(&store, a, T0), "{bytes:?}");
            let v = record_failure(&store, a, &rate(), T0).unwrap();
            assert_eq!(v.remaining, 4);
            assert_eq!(store.get(&key).unwrap().unwrap().0.len(), SET_BYTES);
        }
        // A duplicate way is ignored: the address is still locked, and a failure of
        // another address rewrites the set without it.
        let locked = Mem::default();
        locked.raw_set(&key, &duplicated);
        assert!(!admitted(&locked, a, T0));
        let b = in_set(set_of(&octets(a)), 1, 0)[0];
        record_failure(&locked, b, &rate(), T0).unwrap();
        let ways = decode(&locked.get(&key).unwrap().unwrap().0);
        assert_eq!(
            ways.iter()
                .flatten()
                .filter(|e| e.addr == octets(a))
                .count(),
            1
        );
        assert!(!admitted(&locked, a, T0));
    }

    #[test]
    fn clock_stepping_back_refills_nothing() {
        let store = Mem::default();
        let a = v6(3);
        fail(&store, a, 5, T0);
        assert!(!admitted(&store, a, T0 - 3600 * SEC));
        assert!(!admitted(&store, a, 0));
        // A failure stamped in the past takes nothing back and breaks nothing.
        record_failure(&store, v6(4), &rate(), 0).unwrap();
        record_failure(&store, a, &rate(), T0 - SEC).unwrap();
        assert!(!admitted(&store, a, T0 + 59 * SEC));
        assert!(admitted(&store, a, T0 + 60 * SEC));
        assert!(admitted(&store, v6(5), u64::MAX));
        record_failure(&store, v6(5), &rate(), u64::MAX).unwrap();
    }

    #[test]
    fn sizes() {
        assert_eq!(SET_BYTES, 265);
        let store = Mem::default();
        record_failure(&store, v4(1), &rate(), T0).unwrap();
        assert_eq!(sets(&store)[0].1.len(), SET_BYTES);
    }

    proptest! {
        /// Whatever addresses fail, in whatever order and at whatever times, an address
        /// that never failed is admitted, and every set holds at most WAYS distinct
        /// addresses of its own, each of which did fail.
        #[test]
        fn innocent_addresses_are_always_admitted(
            events in prop::collection::vec((0usize..40, any::<bool>(), 0u64..30 * SEC, any::<bool>()), 1..200),
        ) {
            // 20 addresses crowd into set 0 (more than WAYS), 20 spread anywhere.
            let mut pool = in_set(0, 20, 0);
            pool.extend((0..20).map(|i| v4(i * 7919)));
            let store = Mem::default();
            let mut failed = HashSet::new();
            let mut now = T0;
            for (who, is_failure, gap, back) in events {
                now = if back { now.saturating_sub(gap / 4) } else { now + gap };
                let addr = pool[who];
                if is_failure {
                    record_failure(&store, addr, &rate(), now).unwrap();
                    failed.insert(octets(addr));
                }
                for a in &pool {
                    if !failed.contains(&octets(*a)) {
                        prop_assert!(admitted(&store, *a, now));
                    }
                }
            }
            for (key, bytes, ways) in sets(&store) {
                prop_assert_eq!(bytes.len(), SET_BYTES);
                let index: usize = key.strip_prefix(PREFIX).unwrap().parse().unwrap();
                let used: Vec<_> = ways.iter().flatten().collect();
                prop_assert!(used.len() <= WAYS);
                let distinct: HashSet<_> = used.iter().map(|e| e.addr).collect();
                prop_assert_eq!(distinct.len(), used.len());
                for e in used {
                    prop_assert_eq!(set_of(&e.addr), index);
                    prop_assert!(failed.contains(&e.addr));
                }
            }
        }

        /// With no more addresses in a set than it has ways, nothing is evicted and each
        /// address behaves exactly like its own token bucket.
        #[test]
        fn without_eviction_each_address_is_its_own_bucket(
            events in prop::collection::vec((0usize..WAYS, any::<bool>(), 0u64..20 * SEC), 1..300),
        ) {
            let pool = in_set(1, WAYS, 0);
            let store = Mem::default();
            let mut model: HashMap<usize, Bucket> = HashMap::new();
            let mut now = T0;
            for (who, is_failure, gap) in events {
                now += gap;
                let bucket = *model.entry(who).or_insert_with(|| Bucket::full(&rate(), now));
                if is_failure {
                    let got = record_failure(&store, pool[who], &rate(), now).unwrap();
                    let (next, want) = bucket.take(&rate(), now, 1);
                    prop_assert_eq!(got.admitted, want.admitted);
                    prop_assert_eq!(got.remaining, want.remaining);
                    if want.admitted {
                        model.insert(who, next);
                    }
                } else {
                    let got = check(&store, pool[who], &rate(), now).unwrap();
                    let want = bucket.peek(&rate(), now);
                    prop_assert_eq!(got.admitted, want.admitted);
                    prop_assert_eq!(got.retry_after_s, want.retry_after_s);
                }
            }
        }
    }
}
