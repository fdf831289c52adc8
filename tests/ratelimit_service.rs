//! keygate-ratelimit against a real `redis-server` (Debian package `redis-server`), as the
//! built binary, asked by a tonic client the way Envoy's ratelimit filter asks it.
//!
//! Without `redis-server` these tests fail: install it (`apt-get install redis-server`, or
//! `make setup`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::rate_limit::Unit;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::protobuf::UInt64Value;
use keygate::config::{Per, RateSpec};
use keygate::store::Store;
use tonic::transport::Channel;

const BODY: &[u8] = br#"{"error":"rate_limited","message":"Rate limit exceeded"}"#;

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local address").port()
}

fn redis_server_binary() -> PathBuf {
    let candidates = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"));
    for candidate in candidates {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server was not found in PATH or /usr/bin: these tests need a real Redis. \
         Install the Debian package redis-server (apt-get install -y redis-server, or make setup)."
    );
}

/// A child process killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `redis-server` on a loopback port, without persistence.
struct Redis {
    port: u16,
    process: Option<Process>,
}

impl Redis {
    fn start() -> Redis {
        let mut redis = Redis {
            port: free_port(),
            process: None,
        };
        redis.restart();
        redis
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// (Re)starts the server on the same port and waits until it answers PING.
    fn restart(&mut self) {
        assert!(self.process.is_none(), "Redis is already running");
        let child = Command::new(redis_server_binary())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--loglevel", "warning"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.process = Some(Process(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    }

    /// SIGKILL: the connection drops at once.
    fn kill(&mut self) {
        drop(self.process.take());
    }

    fn signal(&self, signal: &str) {
        let pid = self.process.as_ref().expect("Redis is running").0.id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection())
            .expect("connect to Redis")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        // A stopped server must be continued to die of SIGKILL promptly; harmless otherwise.
        if let Some(p) = &self.process {
            let _ = Command::new("kill")
                .args(["-CONT", &p.0.id().to_string()])
                .status();
        }
    }
}

/// A store whose policy has the given plans (on top of the built-in ones), written the
/// way keygate writes one: a new file renamed over the old.
fn write_store(path: &Path, plans: &[(&str, u64, Per, Option<u64>)]) {
    let mut store = Store::new(None, "/etc/keygate/keygate.wasm".into(), "kg".into());
    for (name, requests, per, burst) in plans {
        store.policy.plans.insert(
            name.to_string(),
            RateSpec {
                requests: *requests,
                per: *per,
                burst: *burst,
            }
            .into(),
        );
    }
    let json = serde_json::to_vec_pretty(&store).expect("serialise the store");
    write_atomically(path, &json);
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write the store");
    std::fs::rename(&tmp, path).expect("rename the store");
}

/// The built `keygate-ratelimit`, its log in a file.
struct Service {
    port: u16,
    log: PathBuf,
    _process: Process,
}

impl Service {
    async fn start(
        dir: &Path,
        name: &str,
        store: &Path,
        redis_url: &str,
        timeout: &str,
    ) -> Service {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_keygate-ratelimit"))
            .arg("--store")
            .arg(store)
            .args(["--redis", redis_url])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--redis-timeout", timeout])
            .args(["--log-level", "info"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the log"))
            .spawn()
            .expect("start keygate-ratelimit");
        let mut service = Service {
            port,
            log,
            _process: Process(child),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = service._process.0.try_wait() {
                panic!(
                    "keygate-ratelimit exited ({status}): {}",
                    service.log_text()
                );
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return service;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("keygate-ratelimit did not listen: {}", service.log_text());
    }

    async fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::connect(format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("connect to keygate-ratelimit")
    }

    fn log_text(&mut self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn descriptor(plan: &str, key_id: &str) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: vec![
            Entry {
                key: "plan".into(),
                value: plan.into(),
            },
            Entry {
                key: "key_id".into(),
                value: key_id.into(),
            },
        ],
        ..RateLimitDescriptor::default()
    }
}

fn request(plan: &str, key_id: &str, hits: u32) -> RateLimitRequest {
    RateLimitRequest {
        domain: "keygate".into(),
        descriptors: vec![descriptor(plan, key_id)],
        hits_addend: hits,
    }
}

async fn ask(
    client: &mut RateLimitServiceClient<Channel>,
    request: RateLimitRequest,
) -> RateLimitResponse {
    client
        .should_rate_limit(request)
        .await
        .expect("ShouldRateLimit")
        .into_inner()
}

fn header<'a>(r: &'a RateLimitResponse, name: &str) -> Option<&'a str> {
    r.response_headers_to_add
        .iter()
        .find(|h| h.key == name)
        .map(|h| h.value.as_str())
}

fn number(r: &RateLimitResponse, name: &str) -> u64 {
    header(r, name)
        .unwrap_or_else(|| panic!("no {name} in {r:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number in {r:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_limit_and_refusals_carry_the_filters_answer() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let store = dir.path().join("keygate.json");
    write_store(&store, &[("tiny", 5, Per::Minute, None)]);
    let a = Service::start(dir.path(), "a", &store, &redis.url(), "250ms").await;
    let b = Service::start(dir.path(), "b", &store, &redis.url(), "250ms").await;

    // 8 concurrent calls, alternating between the two instances.
    let mut calls = Vec::new();
    for i in 0..8 {
        let mut client = if i % 2 == 0 {
            a.client().await
        } else {
            b.client().await
        };
        calls.push(tokio::spawn(async move {
            ask(&mut client, request("tiny", "k_shared", 0)).await
        }));
    }
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    let (ok, over): (Vec<_>, Vec<_>) = answers
        .iter()
        .partition(|r| r.overall_code == Code::Ok as i32);
    assert_eq!(ok.len(), 5, "exactly the burst is admitted: {answers:#?}");
    assert_eq!(over.len(), 3);
    assert!(over
        .iter()
        .all(|r| r.overall_code == Code::OverLimit as i32));

    let mut remaining: Vec<u64> = ok
        .iter()
        .map(|r| number(r, "x-ratelimit-remaining"))
        .collect();
    remaining.sort();
    assert_eq!(remaining, [0, 1, 2, 3, 4]);
    for r in &ok {
        assert_eq!(header(r, "x-ratelimit-limit"), Some("5"));
        assert!((1..=60).contains(&number(r, "x-ratelimit-reset")), "{r:?}");
        assert_eq!(header(r, "retry-after"), None);
        assert!(r.raw_body.is_empty());
        let status = &r.statuses[0];
        assert_eq!(status.code, Code::Ok as i32);
        let limit = status.current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.name.as_str(), limit.requests_per_unit, limit.unit),
            ("tiny", 5, Unit::Minute as i32)
        );
    }
    for r in &over {
        assert_eq!(header(r, "x-ratelimit-limit"), Some("5"));
        assert_eq!(header(r, "x-ratelimit-remaining"), Some("0"));
        let reset = number(r, "x-ratelimit-reset");
        assert!(
            (59..=60).contains(&reset),
            "a just-emptied bucket is full in 60 s: {r:?}"
        );
        // One token every 12 s, rounded up to whole seconds.
        let retry = number(r, "retry-after");
        assert!((11..=12).contains(&retry), "{r:?}");
        assert_eq!(header(r, "content-type"), Some("application/json"));
        assert_eq!(r.raw_body, BODY);
        let status = &r.statuses[0];
        assert_eq!(status.code, Code::OverLimit as i32);
        assert_eq!(status.limit_remaining, 0);
        let until = status.duration_until_reset.as_ref().unwrap();
        assert!((58..=60).contains(&until.seconds), "{status:?}");
    }

    // The bucket is one Redis key holding a time, which expires when the bucket is full.
    let mut redis_conn = redis.connection();
    let tat: f64 = redis::cmd("GET")
        .arg("keygate:rl:4:tiny:k_shared")
        .query::<String>(&mut redis_conn)
        .unwrap()
        .parse()
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut redis_conn).unwrap();
    let now = (secs * 1_000_000 + micros) as f64;
    assert!(
        (tat - now) > 59e6 && (tat - now) <= 60e6 + 1.0,
        "TAT {tat} now {now}"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg("keygate:rl:4:tiny:k_shared")
        .query(&mut redis_conn)
        .unwrap();
    assert!((59_000..=60_000).contains(&ttl), "PTTL {ttl}");

    // Another key has its own bucket.
    let mut client = b.client().await;
    let other = ask(&mut client, request("tiny", "k_other", 1)).await;
    assert_eq!(other.overall_code, Code::Ok as i32);
    assert_eq!(header(&other, "x-ratelimit-remaining"), Some("4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_addend_and_descriptors_that_are_not_limited() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let store = dir.path().join("keygate.json");
    write_store(
        &store,
        &[
            ("tiny", 5, Per::Minute, None),
            ("burst", 2, Per::Second, Some(3)),
        ],
    );
    let mut service = Service::start(dir.path(), "svc", &store, &redis.url(), "250ms").await;
    let mut client = service.client().await;

    let r = ask(&mut client, request("tiny", "k_hits", 3)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("2"));
    let r = ask(&mut client, request("tiny", "k_hits", 3)).await;
    assert_eq!(
        r.overall_code,
        Code::OverLimit as i32,
        "3 tokens are not there: {r:?}"
    );
    assert_eq!(
        header(&r, "x-ratelimit-remaining"),
        Some("2"),
        "a refusal takes nothing"
    );
    // 1 token short: 12 s.
    assert!((11..=12).contains(&number(&r, "retry-after")), "{r:?}");
    let r = ask(&mut client, request("tiny", "k_hits", 2)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));

    // hits_addend 0 is 1; a descriptor's own hits_addend overrides the request's.
    let r = ask(&mut client, request("tiny", "k_zero", 0)).await;
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("4"));
    let mut req = request("tiny", "k_zero", 1);
    req.descriptors[0].hits_addend = Some(UInt64Value { value: 4 });
    let r = ask(&mut client, req).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));

    // A plan of 2 per second with a burst of 3: 3 at once, then one every 500 ms.
    for expected in [2, 1, 0] {
        let r = ask(&mut client, request("burst", "k_b", 1)).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert_eq!(number(&r, "x-ratelimit-remaining"), expected);
        let limit = r.statuses[0].current_limit.as_ref().unwrap();
        assert_eq!(
            (limit.requests_per_unit, limit.unit),
            (2, Unit::Second as i32)
        );
        assert_eq!(header(&r, "x-ratelimit-limit"), Some("2"));
    }
    let r = ask(&mut client, request("burst", "k_b", 1)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(
        header(&r, "retry-after"),
        Some("1"),
        "under 500 ms rounds up to 1 s"
    );
    assert_eq!(
        header(&r, "x-ratelimit-reset"),
        Some("2"),
        "under 1.5 s rounds up to 2 s"
    );
    tokio::time::sleep(Duration::from_millis(550)).await;
    let r = ask(&mut client, request("burst", "k_b", 1)).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "a token refilled: {r:?}");
    assert_eq!(header(&r, "x-ratelimit-remaining"), Some("0"));

    // Not keygate's: another domain, a descriptor without both entries, an unknown plan.
    let mut other_domain = request("tiny", "k_hits", 1);
    other_domain.domain = "elsewhere".into();
    let r = ask(&mut client, other_domain).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.response_headers_to_add.is_empty());
    assert_eq!(r.statuses.len(), 1);
    let mut partial = request("tiny", "k_hits", 1);
    partial.descriptors[0].entries.truncate(1);
    let r = ask(&mut client, partial).await;
    assert_eq!(r.overall_code, Code::Ok as i32);
    assert!(r.response_headers_to_add.is_empty());
    for _ in 0..3 {
        let r = ask(&mut client, request("gold", "k_hits", 1)).await;
        assert_eq!(r.overall_code, Code::Ok as i32);
        assert!(r.response_headers_to_add.is_empty());
    }
    // An unlimited descriptor next to a refused one: statuses in order, OVER_LIMIT.
    let mut mixed = request("tiny", "k_hits", 1);
    mixed.descriptors.insert(
        0,
        RateLimitDescriptor {
            entries: vec![Entry {
                key: "remote_address".into(),
                value: "10.0.0.1".into(),
            }],
            ..RateLimitDescriptor::default()
        },
    );
    let r = ask(&mut client, mixed).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32);
    assert_eq!(r.statuses.len(), 2);
    assert_eq!(r.statuses[0].code, Code::Ok as i32);
    assert_eq!(r.statuses[1].code, Code::OverLimit as i32);

    let log = service.log_text();
    assert_eq!(
        log.matches("plan \"gold\" is not in the store").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("domain \"elsewhere\"").count(), 1, "{log}");
    assert!(
        log.contains(&format!("listening on 127.0.0.1:{}", service.port)),
        "{log}"
    );
    assert!(log.contains(&format!("Redis {} ", redis.url())), "{log}");
    assert!(log.contains("5 plans from"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_change_in_the_store_is_picked_up_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let store = dir.path().join("keygate.json");
    write_store(&store, &[("tiny", 5, Per::Minute, None)]);
    let mut service = Service::start(dir.path(), "svc", &store, &redis.url(), "250ms").await;
    let mut client = service.client().await;
    let r = ask(&mut client, request("tiny", "k_1", 1)).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("5"));
    let r = ask(&mut client, request("hourly", "k_1", 1)).await;
    assert!(r.response_headers_to_add.is_empty(), "not a plan yet");

    write_store(
        &store,
        &[
            ("tiny", 2, Per::Minute, None),
            ("hourly", 100, Per::Hour, None),
        ],
    );
    let changed = Instant::now();
    let limit = loop {
        let r = ask(&mut client, request("tiny", "k_2", 1)).await;
        if header(&r, "x-ratelimit-limit") == Some("2")
            || changed.elapsed() > Duration::from_secs(3)
        {
            break header(&r, "x-ratelimit-limit").map(str::to_string);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let took = changed.elapsed();
    eprintln!("plan change picked up after {took:?}");
    assert_eq!(limit.as_deref(), Some("2"));
    assert!(
        took < Duration::from_millis(1200),
        "picked up after {took:?}"
    );
    let r = ask(&mut client, request("hourly", "k_1", 1)).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("100"));
    assert_eq!(
        r.statuses[0].current_limit.as_ref().unwrap().unit,
        Unit::Hour as i32
    );

    // A store that does not load keeps the plans in force, and is logged once.
    write_atomically(&store, b"{ not a store");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = ask(&mut client, request("tiny", "k_3", 1)).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("2"));
    let log = service.log_text();
    assert_eq!(
        log.matches("keeping the previous plans").count(),
        1,
        "{log}"
    );
    assert_eq!(log.matches("plans reloaded").count(), 1, "{log}");
    assert!(log.contains("changed tiny"), "{log}");
    assert!(log.contains("added hourly"), "{log}");

    // A plan that the filter would refuse is refused too.
    write_store(&store, &[("tiny", 0, Per::Minute, None)]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = ask(&mut client, request("tiny", "k_4", 1)).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("2"));
    assert!(
        service.log_text().contains("plans[\"tiny\"].requests"),
        "{}",
        service.log_text()
    );

    write_store(&store, &[("tiny", 7, Per::Minute, None)]);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let r = ask(&mut client, request("tiny", "k_5", 1)).await;
    assert_eq!(header(&r, "x-ratelimit-limit"), Some("7"));
    let r = ask(&mut client, request("hourly", "k_5", 1)).await;
    assert!(r.response_headers_to_add.is_empty(), "the plan was removed");
}

async fn unavailable_within(
    client: &mut RateLimitServiceClient<Channel>,
    key: &str,
    bound: Duration,
) -> Duration {
    let start = Instant::now();
    let result = client.should_rate_limit(request("tiny", key, 1)).await;
    let took = start.elapsed();
    match result {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(r) => panic!("expected UNAVAILABLE, got {:?}", r.into_inner()),
    }
    assert!(took < bound, "UNAVAILABLE after {took:?}, bound {bound:?}");
    took
}

async fn ok_again_within(
    client: &mut RateLimitServiceClient<Channel>,
    key: &str,
    bound: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        match client.should_rate_limit(request("tiny", key, 1)).await {
            Ok(r) => {
                assert_eq!(r.into_inner().overall_code, Code::Ok as i32);
                return start.elapsed();
            }
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(
                    start.elapsed() < bound,
                    "still UNAVAILABLE after {:?}",
                    start.elapsed()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_failure_is_unavailable_at_once_and_recovery_needs_no_restart() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = Redis::start();
    let store = dir.path().join("keygate.json");
    write_store(&store, &[("tiny", 1000, Per::Minute, None)]);
    let bound = Duration::from_millis(500);

    // Redis down before the service starts: it starts anyway and answers UNAVAILABLE.
    redis.kill();
    let mut service = Service::start(dir.path(), "svc", &store, &redis.url(), "25ms").await;
    let mut client = service.client().await;
    let took = unavailable_within(&mut client, "k", bound).await;
    eprintln!("Redis down at start: UNAVAILABLE after {took:?}");
    redis.restart();
    let took = ok_again_within(&mut client, "k", Duration::from_secs(5)).await;
    eprintln!("Redis started: OK again after {took:?}");

    // Killed: UNAVAILABLE, promptly, as long as it is down.
    redis.kill();
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        worst = worst.max(unavailable_within(&mut client, "k", bound).await);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!("Redis killed: 20 calls UNAVAILABLE, slowest {worst:?}");
    // Restarted on the same port (empty, so the script is loaded again): OK, no restart.
    redis.restart();
    let took = ok_again_within(&mut client, "k", Duration::from_secs(5)).await;
    eprintln!("Redis restarted: OK again after {took:?}");
    let r = ask(&mut client, request("tiny", "k", 1)).await;
    assert_eq!(r.overall_code, Code::Ok as i32);

    // Hung (SIGSTOP): no answer, so the timeout answers UNAVAILABLE.
    redis.signal("-STOP");
    let mut worst = Duration::ZERO;
    for _ in 0..5 {
        let took = unavailable_within(&mut client, "k", bound).await;
        assert!(
            took >= Duration::from_millis(20),
            "waited for the timeout: {took:?}"
        );
        worst = worst.max(took);
    }
    eprintln!("Redis stopped: UNAVAILABLE after at most {worst:?}");
    redis.signal("-CONT");
    let took = ok_again_within(&mut client, "k", Duration::from_secs(5)).await;
    eprintln!("Redis continued: OK again after {took:?}");

    // Errors are logged at most once a second, not once per failed call.
    let log = service.log_text();
    let errors = log.lines().filter(|l| l.contains(" ERROR ")).count() as u64;
    let seconds = started.elapsed().as_secs();
    assert!(
        (1..=seconds + 2).contains(&errors),
        "{errors} error lines in {seconds} s (over 26 failed calls):\n{log}"
    );
}

/// A store whose policy has `plans` (on top of the built-in ones) and asks for
/// `rate_limit_headers`, as JSON the way `keygate` writes it.
fn write_store_json(path: &Path, plans: serde_json::Value, headers: serde_json::Value) {
    let mut store = Store::new(None, "/etc/keygate/keygate.wasm".into(), "kg".into());
    let mut policy = serde_json::to_value(&store.policy).expect("policy as JSON");
    policy["plans"] = plans;
    policy["rate_limit_headers"] = headers;
    store.policy = serde_json::from_value(policy).expect("a valid policy");
    let json = serde_json::to_vec_pretty(&store).expect("serialise the store");
    write_atomically(path, &json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_rates_are_taken_together_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let redis = Redis::start();
    let store = dir.path().join("keygate.json");
    write_store_json(
        &store,
        serde_json::json!({"two": [{"requests": 5, "per": "minute"}, {"requests": 2, "per": "hour"}]}),
        serde_json::json!("ietf"),
    );
    let service = Service::start(dir.path(), "s", &store, &redis.url(), "250ms").await;
    let mut client = service.client().await;
    let policy = r#""two/minute";q=5;w=60, "two/hour";q=2;w=3600"#;
    for left in ["4", "3"] {
        let r = ask(&mut client, request("two", "k_two", 0)).await;
        assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
        assert_eq!(header(&r, "ratelimit-policy"), Some(policy));
        let ratelimit = header(&r, "ratelimit").unwrap();
        assert!(
            ratelimit.starts_with(&format!("\"two/minute\";r={left};t=")),
            "{ratelimit}"
        );
        assert_eq!(header(&r, "x-ratelimit-limit"), None);
    }
    // The hour's 2 are spent: refused, and the minute's bucket is left as it was, however
    // often the refused request comes back.
    for _ in 0..3 {
        let r = ask(&mut client, request("two", "k_two", 0)).await;
        assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
        let ratelimit = header(&r, "ratelimit").unwrap();
        assert!(
            ratelimit.starts_with("\"two/minute\";r=3;t=")
                && ratelimit.contains("\"two/hour\";r=0;t="),
            "{ratelimit}"
        );
        let wait = number(&r, "retry-after");
        assert!((1..=1800).contains(&wait), "{wait}");
    }
    // Both buckets are in Redis: the first under the name of a plan with one rate.
    let mut redis_conn = redis.connection();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("keygate:rl:*")
        .query(&mut redis_conn)
        .unwrap();
    let mut keys = keys;
    keys.sort();
    assert_eq!(keys, ["keygate:rl:3:two:k_two", "keygate:rl:3:two:k_two#1"]);
    // A cost of 3 fits the minute's 5 but never the hour's 2: refused, and the minute keeps
    // its tokens; a cost of 2 then fits both.
    let r = ask(&mut client, request("two", "k_other", 3)).await;
    assert_eq!(r.overall_code, Code::OverLimit as i32, "{r:?}");
    let r = ask(&mut client, request("two", "k_other", 2)).await;
    assert_eq!(r.overall_code, Code::Ok as i32, "{r:?}");
    assert!(header(&r, "ratelimit")
        .unwrap()
        .starts_with("\"two/minute\";r=3;t="));
}
