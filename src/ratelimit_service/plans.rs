//! The plans of a key store, compiled by the filter's own code.
//!
//! The filter's plans are keygate's built-in ones with the policy's `plans` added or
//! overriding them by name, each compiled to a [`Rate`] by [`Config::compile`]. That is
//! reused here as it is: a copy of the store's policy plans, with one stand-in key per
//! plan name, is compiled, and each key's compiled limit is its plan's rate. No default
//! (a plan's `burst`, the built-in tiers, the bounds on `requests`) is repeated here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use crate::config::{self, Config, HeaderStyle, KeySpec, PlanLimits, PluginConfig};
use crate::keys;
use crate::ratelimit::Rate;
use crate::store;

/// The plans by name, each with its rates exactly as the filter computes them, and the
/// rate-limit headers the policy asks for (`rate_limit_headers`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plans {
    /// Plan name to its rates (one or several).
    pub by_name: BTreeMap<String, Arc<PlanLimits>>,
    /// Which headers answers carry.
    pub headers: HeaderStyle,
}

impl Default for Plans {
    fn default() -> Plans {
        Plans::new()
    }
}

impl Plans {
    /// No plans; X-RateLimit-* headers.
    pub fn new() -> Plans {
        Plans {
            by_name: BTreeMap::new(),
            headers: HeaderStyle::XRateLimit,
        }
    }

    /// Plans with these rates (X-RateLimit-* headers), for tests and tools.
    pub fn of<'a>(plans: impl IntoIterator<Item = (&'a str, Vec<Rate>)>) -> Plans {
        Plans {
            by_name: plans
                .into_iter()
                .map(|(name, rates)| (name.to_string(), Arc::new(PlanLimits::new(name, rates))))
                .collect(),
            headers: HeaderStyle::XRateLimit,
        }
    }

    /// The plan named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<PlanLimits>> {
        self.by_name.get(name)
    }

    /// Whether a plan is named `name`.
    pub fn contains_key(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Plan names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_name.keys()
    }

    /// Plans by name, sorted.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Arc<PlanLimits>)> {
        self.by_name.iter()
    }

    /// Number of plans.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// Why a store's plans could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlansError(pub String);

impl fmt::Display for PlansError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PlansError {}

/// The plans of a policy: the built-in ones, overridden or added to by `policy.plans`.
pub fn compile_plans(policy: &PluginConfig) -> Result<Plans, PlansError> {
    let names: BTreeSet<String> = config::builtin_plans()
        .into_keys()
        .chain(policy.plans.keys().cloned())
        .collect();
    let doc = PluginConfig {
        plans: policy.plans.clone(),
        rate_limit_headers: policy.rate_limit_headers,
        keys: names
            .iter()
            .enumerate()
            .map(|(i, name)| stand_in(i, name))
            .collect(),
        ..PluginConfig::default()
    };
    let compiled = Config::compile(&doc).map_err(|e| PlansError(format!("invalid plans: {e}")))?;
    Ok(Plans {
        by_name: compiled
            .keys
            .iter()
            .filter_map(|key| key.limit.as_ref())
            .map(|limit| (limit.plan.clone(), Arc::clone(&limit.limits)))
            .collect(),
        headers: compiled.rate_limit_headers,
    })
}

/// A key that exists only to carry `plan` through the filter's compiler.
fn stand_in(i: usize, plan: &str) -> KeySpec {
    KeySpec {
        id: format!("plan-{i}"),
        hash: keys::hash_string(format!("keygate-ratelimit plan stand-in {i}").as_bytes()),
        client: None,
        tenant: None,
        role: "plan".into(),
        scopes: Vec::new(),
        status: None,
        expires_at: None,
        plan: Some(plan.to_string()),
        allowed_ips: Vec::new(),
        shares_quota_with: None,
    }
}

/// Reads the store at `path`, checks it as `keygate` does before writing one (a store the
/// filter would refuse is refused here too), and compiles its plans.
pub fn load(path: &Path) -> Result<Plans, PlansError> {
    let store = store::load(path).map_err(|e| PlansError(e.to_string()))?;
    store
        .validate()
        .map_err(|e| PlansError(format!("store {}: {e}", path.display())))?;
    compile_plans(&store.policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Per, PlanSpec, RateSpec};

    fn minute(requests: u64, burst: u64) -> Rate {
        Rate {
            requests,
            period_ns: 60_000_000_000,
            burst,
        }
    }

    #[test]
    fn builtin_plans_without_a_policy() {
        let plans = compile_plans(&PluginConfig::default()).unwrap();
        assert_eq!(plans.len(), 3);
        let rates = |name: &str| plans.get(name).map(|p| p.rates.clone());
        assert_eq!(rates("free"), Some(vec![minute(60, 60)]));
        assert_eq!(rates("pro"), Some(vec![minute(600, 600)]));
        assert_eq!(rates("enterprise"), Some(vec![minute(6000, 6000)]));
        assert_eq!(plans.headers, HeaderStyle::XRateLimit);
    }

    #[test]
    fn policy_plans_add_and_override() {
        let policy = PluginConfig {
            plans: BTreeMap::from([
                (
                    "free".to_string(),
                    RateSpec {
                        requests: 5,
                        per: Per::Minute,
                        burst: None,
                    }
                    .into(),
                ),
                (
                    "batch".to_string(),
                    PlanSpec::Several(vec![
                        RateSpec {
                            requests: 10,
                            per: Per::Hour,
                            burst: Some(3),
                        },
                        RateSpec {
                            requests: 50,
                            per: Per::Day,
                            burst: None,
                        },
                    ]),
                ),
            ]),
            ..PluginConfig::default()
        };
        let plans = compile_plans(&policy).unwrap();
        assert_eq!(plans.len(), 4);
        assert_eq!(
            plans.get("free").map(|p| p.rates.clone()),
            Some(vec![minute(5, 5)])
        );
        assert_eq!(
            plans.get("batch").map(|p| p.rates.clone()),
            Some(vec![
                Rate {
                    requests: 10,
                    period_ns: 3_600_000_000_000,
                    burst: 3
                },
                Rate {
                    requests: 50,
                    period_ns: 86_400_000_000_000,
                    burst: 50
                }
            ])
        );
        assert_eq!(
            plans.get("batch").map(|p| p.policy_header.as_str()),
            Some(r#""batch/hour";q=10;w=3600;keygate-burst=3, "batch/day";q=50;w=86400"#)
        );
    }

    #[test]
    fn plans_the_filter_refuses_are_refused() {
        let policy = PluginConfig {
            plans: BTreeMap::from([(
                "zero".to_string(),
                RateSpec {
                    requests: 0,
                    per: Per::Second,
                    burst: None,
                }
                .into(),
            )]),
            ..PluginConfig::default()
        };
        let e = compile_plans(&policy).unwrap_err();
        assert!(e.0.contains("plans.zero.requests"), "{e}");
    }

    #[test]
    fn a_store_that_is_not_there_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = load(&dir.path().join("missing.json")).unwrap_err();
        assert!(e.0.contains("no store at"), "{e}");
    }
}
