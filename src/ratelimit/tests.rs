use super::*;
use proptest::prelude::*;

const SEC: u64 = 1_000_000_000;
const T0: u64 = 1_800_000_000 * SEC;

fn per_minute(requests: u64, burst: u64) -> Rate {
    Rate {
        requests,
        period_ns: 60 * SEC,
        burst,
    }
}

#[test]
fn full_bucket_admits_burst_then_refuses() {
    let rate = per_minute(60, 5);
    let mut b = Bucket::full(&rate, T0);
    for left in (0..5).rev() {
        let (next, v) = b.take(&rate, T0, 1);
        assert!(v.admitted);
        assert_eq!(v.remaining, left);
        b = next;
    }
    let (_, v) = b.take(&rate, T0, 1);
    assert!(!v.admitted);
    assert_eq!(v.remaining, 0);
    assert_eq!(v.retry_after_s, 1); // 60/min: one token a second
    assert_eq!(v.reset_s, 5);
}

#[test]
fn refills_at_the_rate() {
    let rate = per_minute(60, 60);
    let b = Bucket {
        nanotokens: 0,
        updated_ns: T0,
    };
    assert_eq!(b.peek(&rate, T0 + SEC / 2).remaining, 0);
    assert_eq!(b.peek(&rate, T0 + SEC).remaining, 1);
    assert_eq!(b.peek(&rate, T0 + 30 * SEC).remaining, 30);
    assert_eq!(b.peek(&rate, T0 + 3600 * SEC).remaining, 60); // capped
}

#[test]
fn retry_after_and_reset_round_up() {
    // 1 request per hour, burst 2.
    let rate = Rate {
        requests: 1,
        period_ns: 3600 * SEC,
        burst: 2,
    };
    let empty = Bucket {
        nanotokens: 0,
        updated_ns: T0,
    };
    let v = empty.peek(&rate, T0);
    assert!(!v.admitted);
    assert_eq!(v.retry_after_s, 3600);
    assert_eq!(v.reset_s, 7200);
    let v = empty.peek(&rate, T0 + 1800 * SEC);
    assert_eq!(v.retry_after_s, 1800);
    assert_eq!(v.reset_s, 5400);
    // Less than a second to go still says 1.
    let v = empty.peek(&rate, T0 + 3600 * SEC - 1);
    assert_eq!(v.retry_after_s, 1);
}

#[test]
fn clock_stepping_back_refills_nothing_and_keeps_time() {
    let rate = per_minute(60, 10);
    let b = Bucket {
        nanotokens: 0,
        updated_ns: T0,
    };
    let back = b.refilled(&rate, T0 - 3600 * SEC);
    assert_eq!(back, b);
    // Returning to the original time gives no credit for the excursion.
    assert_eq!(back.refilled(&rate, T0), b);
    assert_eq!(b.refilled(&rate, 0), b);
}

#[test]
fn extreme_values_do_not_overflow() {
    let rate = Rate {
        requests: u64::MAX,
        period_ns: 1,
        burst: u64::MAX,
    };
    let b = Bucket::full(&rate, 0);
    let (b, v) = b.take(&rate, u64::MAX, 1);
    assert!(v.admitted);
    let _ = b.peek(&rate, u64::MAX);
    let slow = Rate {
        requests: 1,
        period_ns: u64::MAX,
        burst: 1,
    };
    let v = Bucket {
        nanotokens: 0,
        updated_ns: 0,
    }
    .peek(&slow, 0);
    assert!(v.retry_after_s > 0);
}

#[test]
fn encoding_round_trips_and_rejects_garbage() {
    let b = Bucket {
        nanotokens: 123_456_789_012,
        updated_ns: T0 + 17,
    };
    assert_eq!(Bucket::decode(&b.encode()), Some(b));
    assert_eq!(Bucket::decode(&[0; 15]), None);
    assert_eq!(Bucket::decode(&[0; 17]), None);
    assert_eq!(Bucket::decode(&[]), None);
}

#[test]
fn store_loop_takes_exactly_once() {
    let store = MemoryStore::default();
    let rate = per_minute(600, 3);
    let admitted = (0..10)
        .filter(|_| take(&store, "b", &rate, T0, 1).unwrap().admitted)
        .count();
    assert_eq!(admitted, 3);
    assert_eq!(store.len(), 1);
    assert_eq!(
        peek(&store, "b", &rate, T0 + 100_000_000)
            .unwrap()
            .remaining,
        1
    );
}

/// A store on which another worker writes between every read and write.
struct Contended {
    inner: MemoryStore,
    interfere: std::cell::Cell<usize>,
}

impl Store for Contended {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let got = self.inner.get(key)?;
        if self.interfere.get() > 0 {
            self.interfere.set(self.interfere.get() - 1);
            if let Some((bytes, _)) = &got {
                // The other worker takes a token.
                let rate = per_minute(60, 100);
                let b = Bucket::decode(bytes).unwrap();
                let (next, _) = b.take(&rate, T0, 1);
                self.inner.set(key, &next.encode(), 0)?;
            }
        }
        Ok(got)
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        self.inner.set(key, value, version)
    }
}

#[test]
fn conflicts_are_retried_and_nothing_is_lost() {
    let rate = per_minute(60, 100);
    let store = Contended {
        inner: MemoryStore::default(),
        interfere: std::cell::Cell::new(5),
    };
    take(&store.inner, "b", &rate, T0, 0).unwrap();
    let v = take(&store, "b", &rate, T0, 1).unwrap();
    assert!(v.admitted);
    // 5 tokens taken by the "other worker", 1 by us.
    assert_eq!(v.remaining, 94);
}

#[test]
fn endless_conflict_refuses_instead_of_admitting() {
    let rate = per_minute(60, 100);
    let store = Contended {
        inner: MemoryStore::default(),
        interfere: std::cell::Cell::new(usize::MAX),
    };
    take(&store.inner, "b", &rate, T0, 0).unwrap();
    assert_eq!(take(&store, "b", &rate, T0, 1), Err(LimitError::Contended));
}

/// Another worker creates the bucket (and takes a token) between our read, which found
/// nothing, and our write.
struct RacingCreate {
    inner: MemoryStore,
    raced: std::cell::Cell<bool>,
}

impl Store for RacingCreate {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        let got = self.inner.get(key)?;
        if got.is_none() && !self.raced.replace(true) {
            let rate = per_minute(60, 10);
            let (other, _) = Bucket::full(&rate, T0).take(&rate, T0, 1);
            self.inner.set(key, &other.encode(), 0)?;
        }
        Ok(got)
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        self.inner.set(key, value, version)
    }
}

#[test]
fn racing_creation_loses_no_token() {
    let rate = per_minute(60, 10);
    let store = RacingCreate {
        inner: MemoryStore::default(),
        raced: std::cell::Cell::new(false),
    };
    let v = take(&store, "b", &rate, T0, 1).unwrap();
    assert!(v.admitted);
    // Both tokens are accounted for: ours and the other worker's.
    assert_eq!(v.remaining, 8);
}

proptest! {
    /// Over any sequence of request times, admitted requests never exceed
    /// burst + rate x elapsed, and a request finding a whole token is admitted.
    #[test]
    fn never_admits_more_than_burst_plus_rate(
        requests in 1u64..10_000,
        period_s in prop::sample::select(vec![1u64, 60, 3600, 86_400]),
        burst in 1u64..500,
        gaps in prop::collection::vec(0u64..5 * SEC, 1..400),
        back_steps in prop::collection::vec(any::<bool>(), 400),
    ) {
        let rate = Rate { requests, period_ns: period_s * SEC, burst };
        let mut b = Bucket::full(&rate, T0);
        let mut now = T0;
        let mut latest = T0;
        let mut admitted: u128 = 0;
        for (i, gap) in gaps.iter().enumerate() {
            // The host clock sometimes steps back.
            if back_steps[i % back_steps.len()] && i % 7 == 3 {
                now = now.saturating_sub(*gap);
            } else {
                now += gap;
            }
            latest = latest.max(now);
            let before = b.refilled(&rate, now);
            let (next, v) = b.take(&rate, now, 1);
            prop_assert_eq!(v.admitted, before.nanotokens >= 1_000_000_000);
            if v.admitted {
                admitted += 1;
            }
            b = next;
            let elapsed = u128::from(latest - T0);
            let bound = u128::from(burst) + elapsed * u128::from(requests) / u128::from(rate.period_ns);
            prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
        }
    }
}

/// Counts the writes that reach the shared store.
#[derive(Default)]
struct Counting {
    inner: MemoryStore,
    writes: std::cell::Cell<u64>,
}

impl Store for Counting {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        self.writes.set(self.writes.get() + 1);
        self.inner.set(key, value, version)
    }
}

#[test]
fn small_buckets_are_never_leased() {
    // Burst 100 < 128: every request goes to the shared bucket, so two workers between
    // them admit exactly the burst, as with `take`.
    let rate = per_minute(1, 100);
    assert_eq!(max_lease(&rate), 1);
    let store = Counting::default();
    let (mut a, mut b) = (Leases::default(), Leases::default());
    let mut admitted = 0;
    for i in 0..300 {
        let leases = if i % 2 == 0 { &mut a } else { &mut b };
        if take_leased(&store, leases, "k", &rate, T0)
            .unwrap()
            .admitted
        {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 100);
    assert_eq!(store.writes.get(), 100);
    assert!(a.is_empty() && b.is_empty());
}

#[test]
fn a_busy_worker_takes_tokens_ahead_and_writes_rarely() {
    let rate = Rate {
        requests: 1_000_000,
        period_ns: SEC,
        burst: 1_000_000,
    };
    assert_eq!(max_lease(&rate), MAX_LEASE);
    let store = Counting::default();
    let mut leases = Leases::default();
    for i in 0..10_000u64 {
        // 10,000 requests within one millisecond: refill adds at most 1,000 tokens.
        let v = take_leased(&store, &mut leases, "k", &rate, T0 + i * 100).unwrap();
        assert!(v.admitted);
        // Unspent leased tokens count as remaining: never more than the bucket holds.
        assert!(v.remaining < rate.burst && v.remaining + i + 1 >= rate.burst);
    }
    // Leases of 1, 2, 4 .. 256 tokens, then 256 each: about 10,000 / 256 + 9 writes.
    assert!(store.writes.get() <= 50, "{} writes", store.writes.get());
    assert!(
        store.writes.get() >= 10_000 / MAX_LEASE,
        "{} writes",
        store.writes.get()
    );
    // The shared bucket has paid for every token admitted, and for those still held.
    let (bytes, _) = store.get("k").unwrap().unwrap();
    let shared = Bucket::decode(&bytes).unwrap();
    let spent = rate.burst - shared.nanotokens / 1_000_000_000;
    assert!(spent <= 10_000 + MAX_LEASE + 1_000, "{spent}");
}

#[test]
fn an_idle_lease_expires_and_shrinks() {
    let rate = Rate {
        requests: 100_000,
        period_ns: SEC,
        burst: 100_000,
    };
    let store = Counting::default();
    let mut leases = Leases::default();
    // Ramp up: every lease used up at once, so each is twice the last.
    for i in 0..(1 + 2 + 4 + 8) {
        assert!(
            take_leased(&store, &mut leases, "k", &rate, T0 + i)
                .unwrap()
                .admitted
        );
    }
    assert_eq!(store.writes.get(), 4);
    // One more: a lease of 16, of which 15 are left unspent when it expires.
    assert!(
        take_leased(&store, &mut leases, "k", &rate, T0 + 20)
            .unwrap()
            .admitted
    );
    assert_eq!(store.writes.get(), 5);
    let writes = store.writes.get();
    let later = T0 + 20 + LEASE_TTL_NS;
    assert!(
        take_leased(&store, &mut leases, "k", &rate, later)
            .unwrap()
            .admitted
    );
    assert_eq!(
        store.writes.get(),
        writes + 1,
        "an expired lease is not spent"
    );
    // The next lease is half the size (8): 7 more requests without a write, then one.
    for i in 1..=7 {
        take_leased(&store, &mut leases, "k", &rate, later + i).unwrap();
    }
    assert_eq!(store.writes.get(), writes + 1);
    take_leased(&store, &mut leases, "k", &rate, later + 8).unwrap();
    assert_eq!(store.writes.get(), writes + 2);
}

#[test]
fn an_empty_bucket_refuses_even_with_a_lease_history() {
    // Burst 128: leases of at most 2. Two workers drain it; then both are refused until
    // the refill (1 per minute) gives a token, which exactly one of them gets.
    let rate = per_minute(1, 128);
    assert_eq!(max_lease(&rate), 2);
    let store = MemoryStore::default();
    let (mut a, mut b) = (Leases::default(), Leases::default());
    let mut admitted = 0;
    for i in 0..400 {
        let leases = if i % 3 == 0 { &mut a } else { &mut b };
        if take_leased(&store, leases, "k", &rate, T0)
            .unwrap()
            .admitted
        {
            admitted += 1;
        }
    }
    assert!((126..=128).contains(&admitted), "{admitted}");
    let v = take_leased(&store, &mut a, "k", &rate, T0 + 2 * LEASE_TTL_NS).unwrap();
    assert!(!v.admitted);
    assert!((58..=59).contains(&v.retry_after_s), "{}", v.retry_after_s);
    let t = T0 + 61 * SEC;
    let first = take_leased(&store, &mut a, "k", &rate, t).unwrap();
    let second = take_leased(&store, &mut b, "k", &rate, t).unwrap();
    assert!(first.admitted && !second.admitted);
}

#[test]
fn too_many_leases_fall_back_to_single_tokens() {
    let rate = per_minute(60_000, 60_000);
    let store = MemoryStore::default();
    let mut leases = Leases::default();
    for i in 0..MAX_LEASES {
        take_leased(&store, &mut leases, &format!("k{i}"), &rate, T0).unwrap();
    }
    assert_eq!(leases.len(), MAX_LEASES);
    assert!(
        take_leased(&store, &mut leases, "one-more", &rate, T0)
            .unwrap()
            .admitted
    );
    assert_eq!(leases.len(), MAX_LEASES);
    // Once the old ones expire they make room again.
    take_leased(&store, &mut leases, "one-more", &rate, T0 + LEASE_TTL_NS).unwrap();
    assert_eq!(leases.len(), 1);
}

proptest! {
    /// However requests interleave across workers, and whatever the lease sizes, the
    /// workers together admit no more than burst + rate x elapsed.
    #[test]
    fn leases_never_admit_more_than_the_bucket(
        requests in 1u64..100_000,
        burst in 128u64..20_000,
        steps in prop::collection::vec((0usize..3, 0u64..SEC / 50), 1..3000),
    ) {
        let rate = Rate { requests, period_ns: SEC, burst };
        let store = MemoryStore::default();
        let mut workers = [Leases::default(), Leases::default(), Leases::default()];
        let mut now = T0;
        let mut admitted: u128 = 0;
        for (worker, gap) in steps {
            now += gap;
            if take_leased(&store, &mut workers[worker], "k", &rate, now).unwrap().admitted {
                admitted += 1;
            }
            let bound = u128::from(burst) + u128::from(now - T0) * u128::from(requests) / u128::from(SEC);
            prop_assert!(admitted <= bound, "admitted {} > bound {}", admitted, bound);
        }
    }
}

fn per_day(requests: u64, burst: u64) -> Rate {
    Rate {
        requests,
        period_ns: 86_400 * SEC,
        burst,
    }
}

#[test]
fn several_buckets_admit_only_together_and_a_refusal_takes_nothing() {
    let store = MemoryStore::default();
    let rates = [per_minute(60, 60), per_day(3, 3)];
    let names = ["k", "k#1"];
    for _ in 0..3 {
        let v = take_each(&store, &names, &rates, T0).unwrap();
        assert!(v.admitted);
        assert_eq!(v.retry_after_s(), 0);
    }
    // The day's bucket is empty: refused, and the minute's token is given back.
    let before = peek(&store, "k", &rates[0], T0).unwrap();
    let v = take_each(&store, &names, &rates, T0).unwrap();
    assert!(!v.admitted);
    assert_eq!(v.each.len(), 2);
    assert!(v.each[0].admitted, "the minute would have admitted");
    assert!(!v.each[1].admitted);
    assert_eq!(v.retry_after_s(), 86_400 / 3);
    assert_eq!(peek(&store, "k", &rates[0], T0).unwrap(), before);
    assert_eq!(before.remaining, 57);
}

#[test]
fn a_refusal_by_the_first_bucket_reads_the_others_for_retry_after() {
    let store = MemoryStore::default();
    let rates = [per_minute(1, 1), per_day(1, 1)];
    let names = ["k", "k#1"];
    assert!(take_each(&store, &names, &rates, T0).unwrap().admitted);
    let v = take_each(&store, &names, &rates, T0 + SEC).unwrap();
    assert!(!v.admitted);
    // Both are empty; every bucket admits again only when the day's has refilled.
    // (Refill rounds down and waits round up: 59 s and a little, so 60.)
    assert_eq!(v.each[0].retry_after_s, 60);
    assert!(!v.each[1].admitted);
    assert_eq!(v.retry_after_s(), 86_400);
}

/// A store that refuses some writes (as a conflict, or a host failure) on a schedule.
struct Flaky {
    inner: MemoryStore,
    schedule: Vec<u8>,
    at: std::cell::Cell<usize>,
}

impl Store for Flaky {
    fn get(&self, key: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        self.inner.get(key)
    }

    fn set(&self, key: &str, value: &[u8], version: u32) -> Result<(), StoreError> {
        let n = self.at.get();
        self.at.set(n + 1);
        match self.schedule.get(n % self.schedule.len().max(1)) {
            Some(1) => Err(StoreError::Conflict),
            Some(2) => Err(StoreError::Host(1)),
            _ => self.inner.set(key, value, version),
        }
    }
}

proptest! {
    /// With several rates and any request times (and writes that sometimes fail, so that
    /// tokens are given back or lost), the requests admitted within any window never
    /// exceed any one rate's allowance: its burst plus what it refills over the window.
    /// A request is admitted exactly when every bucket holds a token, if no write fails.
    #[test]
    fn several_rates_never_admit_beyond_any_one(
        rates in prop::collection::vec(
            (1u64..50, prop::sample::select(vec![1u64, 60, 3600, 86_400]), 1u64..20),
            1..4,
        ),
        gaps in prop::collection::vec(0u64..3 * SEC, 1..300),
        schedule in prop::collection::vec(prop::sample::select(vec![0u8, 0, 0, 0, 0, 1, 2]), 1..50),
        flaky in any::<bool>(),
    ) {
        let rates: Vec<Rate> = rates
            .iter()
            .map(|&(requests, period_s, burst)| Rate { requests, period_ns: period_s * SEC, burst })
            .collect();
        let names: Vec<String> = (0..rates.len()).map(|i| format!("k#{i}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let store = Flaky {
            inner: MemoryStore::default(),
            schedule: if flaky { schedule } else { vec![0] },
            at: std::cell::Cell::new(0),
        };
        let mut now = T0;
        let mut admitted_at: Vec<u64> = Vec::new();
        for gap in gaps {
            now += gap;
            let has_tokens = names
                .iter()
                .zip(&rates)
                .all(|(name, rate)| peek(&store.inner, name, rate, now).unwrap().admitted);
            match take_each(&store, &names, &rates, now) {
                Ok(v) => {
                    if !flaky {
                        prop_assert_eq!(v.admitted, has_tokens);
                    }
                    if v.admitted {
                        prop_assert!(has_tokens);
                        admitted_at.push(now);
                    } else {
                        prop_assert!(v.retry_after_s() >= 1);
                    }
                }
                Err(_) => prop_assert!(flaky),
            }
        }
        for (a, &start) in admitted_at.iter().enumerate() {
            for (b, &end) in admitted_at.iter().enumerate().skip(a) {
                let count = (b - a + 1) as u128;
                for rate in &rates {
                    let allowance = u128::from(rate.burst)
                        + u128::from(end - start) * u128::from(rate.requests) / u128::from(rate.period_ns);
                    prop_assert!(
                        count <= allowance,
                        "{} admitted in {} ns, over {:?}'s allowance of {}", count, end - start, rate, allowance
                    );
                }
            }
        }
    }
}
