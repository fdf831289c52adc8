//! The gRPC service: `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.
//!
//! Per request: the descriptors are mapped to buckets ([`decide::select`]), every bucket is
//! taken from in Redis within `--redis-timeout` ([`Limiter::take_all`]), and the replies
//! become the answer ([`decide::response`]). When Redis fails or does not answer in time,
//! the call fails with gRPC `UNAVAILABLE`, and Envoy's filter applies its
//! `failure_mode_deny` choice.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::decide::{self, Outcome, Selection, DOMAIN};
use super::gcra::{Limiter, TakeError};
use super::logging::{ErrorBudget, Once};
use super::plans;
use super::watch::{self, Current, Watcher};
use crate::config::HeaderStyle;

/// What the service is started with (the command line).
#[derive(Debug, Clone)]
pub struct Options {
    /// The key store whose plans are the limits.
    pub store: PathBuf,
    /// `redis://[user:password@]host:port[/db]`.
    pub redis: String,
    /// Address to serve gRPC on.
    pub listen: SocketAddr,
    /// How long a request may wait for Redis before it is answered `UNAVAILABLE`.
    pub redis_timeout: Duration,
}

/// Default of `--redis-timeout`.
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_millis(25);

/// Reads a timeout such as `25ms`, `1s` or `1500us`: a whole number and a unit.
pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let bad = || format!("{text:?} is not a duration such as 25ms, 1s or 500us");
    let n: u64 = number.parse().map_err(|_| bad())?;
    let d = match unit {
        "us" | "µs" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(bad()),
    };
    if d.is_zero() || d > Duration::from_secs(60) {
        return Err(format!("{text:?} must be more than 0 and at most 60s"));
    }
    Ok(d)
}

/// The service behind the gRPC endpoint.
pub struct Service {
    plans: Arc<Current>,
    limiter: Limiter,
    errors: ErrorBudget,
    unknown_plans: Arc<Once>,
    unknown_domains: Once,
}

impl Service {
    fn unlimited(n: usize) -> RateLimitResponse {
        decide::response(&vec![Outcome::Unlimited; n], HeaderStyle::XRateLimit)
    }

    fn note_unknown_plan(&self, plan: &str) {
        match self.unknown_plans.first(plan) {
            Some(true) => log::warn!(
                "plan {plan:?} is not in the store; its keys are not limited here (the filter's own limit still applies)"
            ),
            Some(false) => {}
            None => self
                .errors
                .error(|| format!("plan {plan:?} is not in the store; not limited here")),
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Service {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let request = request.into_inner();
        if request.domain != DOMAIN {
            if self.unknown_domains.first(&request.domain) == Some(true) {
                log::warn!(
                    "domain {:?} is not {DOMAIN:?}; its requests are answered OK",
                    request.domain
                );
            }
            return Ok(Response::new(Service::unlimited(request.descriptors.len())));
        }
        let plans = self.plans.get();
        let style = plans.headers;
        let selections: Vec<Selection<'_>> = request
            .descriptors
            .iter()
            .map(|d| decide::select(d, &plans, request.hits_addend))
            .collect();
        let mut buckets = Vec::new();
        for selection in &selections {
            match selection {
                Selection::Limited(bucket) => buckets.push(bucket),
                Selection::UnknownPlan(plan) => self.note_unknown_plan(plan),
                Selection::Ignored => {}
            }
        }
        if buckets.is_empty() {
            return Ok(Response::new(Service::unlimited(selections.len())));
        }
        let replies = match self.limiter.take_all(&buckets).await {
            Ok(replies) => replies,
            Err(e) => {
                let timeout = self.limiter.timeout();
                self.errors.error(|| match &e {
                    TakeError::Timeout => {
                        format!("Redis did not answer within {timeout:?}; answering UNAVAILABLE")
                    }
                    other => format!("{other}; answering UNAVAILABLE"),
                });
                return Err(Status::unavailable(match e {
                    TakeError::Timeout => format!("Redis did not answer within {timeout:?}"),
                    other => other.to_string(),
                }));
            }
        };
        let mut replies = replies.into_iter();
        let outcomes: Vec<Outcome> = selections
            .into_iter()
            .map(|selection| match selection {
                Selection::Limited(bucket) => {
                    replies
                        .next()
                        .map_or(Outcome::Unlimited, |replies| Outcome::Limited {
                            plan: bucket.plan,
                            limits: bucket.limits,
                            replies,
                        })
                }
                Selection::UnknownPlan(_) | Selection::Ignored => Outcome::Unlimited,
            })
            .collect();
        Ok(Response::new(decide::response(&outcomes, style)))
    }
}

/// Serves on `listener` until `shutdown` completes: loads the store (an error here is
/// returned: the service does not start without plans), watches it, and answers Envoy.
/// Redis need not be up yet.
pub async fn serve(
    options: Options,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    let seen = watch::signature(&options.store);
    let path = options.store.clone();
    let loaded = tokio::task::spawn_blocking(move || plans::load(&path))
        .await
        .map_err(|e| format!("loading the store failed: {e}"))?
        .map_err(|e| e.to_string())?;
    let limiter = Limiter::new(&options.redis, options.redis_timeout)
        .map_err(|e| format!("bad Redis URL {}: {e}", decide::redact_url(&options.redis)))?;
    let local = listener
        .local_addr()
        .map_err(|e| format!("listener: {e}"))?;
    log::info!(
        "listening on {local}; Redis {} (timeout {:?}); {} plans from {}",
        decide::redact_url(&options.redis),
        options.redis_timeout,
        loaded.len(),
        options.store.display()
    );
    let current = Arc::new(Current::new(loaded));
    let unknown_plans = Arc::new(Once::default());
    let forget = Arc::clone(&unknown_plans);
    let watcher = Watcher::new(
        options.store.clone(),
        seen,
        Arc::clone(&current),
        Box::new(move |_| forget.clear()),
    );
    let watching = tokio::spawn(watcher.run());
    let service = Service {
        plans: current,
        limiter,
        errors: ErrorBudget::default(),
        unknown_plans,
        unknown_domains: Once::default(),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let served = tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(RateLimitServiceServer::new(service), incoming, shutdown)
        .await;
    watching.abort();
    served.map_err(|e| format!("gRPC server: {e}"))
}

/// Binds `options.listen` and serves until SIGINT or SIGTERM.
pub async fn run(options: Options) -> Result<(), String> {
    let listener = TcpListener::bind(options.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", options.listen))?;
    serve(options, listener, stopped()).await?;
    log::info!("stopped");
    Ok(())
}

/// Completes on SIGINT or SIGTERM (a signal that cannot be waited for never completes).
async fn stopped() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                if term.recv().await.is_none() {
                    std::future::pending::<()>().await;
                }
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = interrupt => {}
        _ = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("25ms"), Ok(Duration::from_millis(25)));
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("500us"), Ok(Duration::from_micros(500)));
        for bad in ["", "25", "ms", "0ms", "-1ms", "2m", "61s", "1.5s"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
