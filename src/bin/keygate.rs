//! `keygate`: manages the API keys the filter accepts, in a store of hashes, and renders
//! the filter's configuration from it. The logic lives in `keygate::store`; this file
//! parses arguments and prints.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use clap::{Args, Parser, Subcommand, ValueEnum};
use keygate::fleet::{self, EnvoyState, Status};
use keygate::store::admin::GetError;
use keygate::store::{
    self, AdminChange, Applied, ApplyOptions, Committed, Confirmation, Error, Module, NewKey,
    State, Store, StoredKey, Transition,
};
use keygate::usage::{self, Flag, KeyUsage, Usage};
use keygate::{config, decision, keys, time};
use serde_json::{json, Value};
use std::io::{Read, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Manage keygate's API keys: a store of SHA-256 hashes and metadata, never plaintext
/// keys, rendered into the filter's configuration and checked with the filter's rules.
#[derive(Parser)]
#[command(name = "keygate", version)]
struct Cli {
    /// The key store.
    #[arg(
        long,
        global = true,
        env = "KEYGATE_STORE",
        default_value = store::DEFAULT_STORE,
        value_name = "PATH"
    )]
    store: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Who makes the change, in the audit log [default: $SUDO_USER, else $USER, else the uid].
    #[arg(long, global = true, value_name = "NAME")]
    actor: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum PolicyAction {
    /// Print the store's policy (JSON).
    Show,
    /// Check a policy file with the filter's own code, against the store's keys (a key's
    /// plan must still exist); changes nothing.
    Check {
        /// A plugin configuration JSON without keys.
        file: PathBuf,
    },
    /// Replace the store's policy with a file, after the same checks.
    Set {
        /// A plugin configuration JSON without keys.
        file: PathBuf,
        #[command(flatten)]
        apply: ApplyFlags,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Create a new store with the default policy (refuses to overwrite one).
    Init {
        /// ECDS file that `apply` and `--apply` write for Envoy to watch; a relative
        /// path is taken from the store's directory.
        #[arg(long, value_name = "PATH")]
        ecds: Option<String>,
        /// The filter's .wasm, as Envoy will open it.
        #[arg(long, value_name = "PATH", default_value = store::DEFAULT_WASM)]
        wasm: String,
        /// Prefix of generated keys (1 to 16 lowercase letters or digits).
        #[arg(long, default_value = store::DEFAULT_PREFIX)]
        prefix: String,
        /// Start from this policy (a plugin configuration JSON without keys: routes,
        /// plans, ip_rules, ...) instead of the default one; --prefix is then ignored.
        #[arg(long, value_name = "FILE")]
        policy: Option<PathBuf>,
        /// Envoy's admin interface (http://HOST:PORT), where --apply confirms that Envoy
        /// took a change up; repeat it for each Envoy of a fleet watching the ECDS file.
        #[arg(long, value_name = "URL", value_parser = parse_admin_url)]
        envoy_admin: Vec<String>,
    },
    /// Generate a key, store its hash, and print the key once.
    Create {
        /// Name shown in lists.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        identity: Identity,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// List the keys (never a key or its hash), optionally only some of them.
    List {
        /// Only keys with this role.
        #[arg(long)]
        role: Option<String>,
        /// Only keys in this state now.
        #[arg(long, value_enum)]
        status: Option<StatusFilter>,
        /// Only keys on this plan (the default plan counts for keys without their own).
        #[arg(long)]
        plan: Option<String>,
        /// Only keys of this client.
        #[arg(long)]
        client: Option<String>,
    },
    /// Change a key's role, scopes, plan, client, tenant, allowed IPs, expiry, name or
    /// description; its secret stays the same. Checked as create checks.
    #[command(group(
        clap::ArgGroup::new("changes")
            .required(true)
            .multiple(true)
            .args(["name", "description", "clear_description", "role", "scopes", "add_scopes",
                   "remove_scopes", "clear_scopes", "plan", "default_plan", "client",
                   "clear_client", "tenant", "clear_tenant", "allowed_ips", "any_ip",
                   "expires_in", "expires_at", "no_expiry"])
    ))]
    Update {
        /// Key id.
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long, conflicts_with = "clear_description")]
        description: Option<String>,
        /// Remove the description.
        #[arg(long)]
        clear_description: bool,
        /// New role.
        #[arg(long)]
        role: Option<String>,
        /// Exactly these scopes (repeatable); --add-scope and --remove-scope apply after.
        #[arg(long = "scope", value_name = "SCOPE", conflicts_with = "clear_scopes")]
        scopes: Vec<String>,
        /// Add a scope (repeatable).
        #[arg(long = "add-scope", value_name = "SCOPE")]
        add_scopes: Vec<String>,
        /// Remove a scope the key has (repeatable).
        #[arg(long = "remove-scope", value_name = "SCOPE")]
        remove_scopes: Vec<String>,
        /// Remove every scope.
        #[arg(long)]
        clear_scopes: bool,
        /// New rate-limit plan.
        #[arg(long, conflicts_with = "default_plan")]
        plan: Option<String>,
        /// Use the policy's default_plan (remove the key's own plan).
        #[arg(long)]
        default_plan: bool,
        /// New client.
        #[arg(long, conflicts_with = "clear_client")]
        client: Option<String>,
        /// Remove the client.
        #[arg(long)]
        clear_client: bool,
        /// New tenant.
        #[arg(long, conflicts_with = "clear_tenant")]
        tenant: Option<String>,
        /// Remove the tenant.
        #[arg(long)]
        clear_tenant: bool,
        /// Exactly these addresses or CIDR blocks (repeatable).
        #[arg(long = "allowed-ip", value_name = "CIDR", conflicts_with = "any_ip")]
        allowed_ips: Vec<String>,
        /// Allow any address (remove the allowed IPs).
        #[arg(long)]
        any_ip: bool,
        /// New lifetime from now: 90d, 24h, 30m or 3600s.
        #[arg(long, value_name = "DURATION", value_parser = store::parse_duration,
              conflicts_with_all = ["expires_at", "no_expiry"])]
        expires_in: Option<i64>,
        /// New expiry instant (RFC 3339).
        #[arg(long, value_name = "RFC3339", value_parser = time::parse_rfc3339,
              conflicts_with = "no_expiry")]
        expires_at: Option<i64>,
        /// Never expire (remove the expiry).
        #[arg(long)]
        no_expiry: bool,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Remove revoked and expired keys from the store (and so, at the next apply, from
    /// Envoy's configuration), after listing them.
    Prune {
        /// Only keys revoked or expired at least this long ago: 30d, 24h, 0s, ...
        #[arg(long, value_name = "DURATION", value_parser = store::parse_duration)]
        older_than: i64,
        /// List what would be removed; change nothing.
        #[arg(long, conflicts_with = "apply")]
        dry_run: bool,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Read the audit log (`<store>.audit.jsonl`): who changed what, when.
    Audit {
        /// Only lines about this key.
        #[arg(long, value_name = "ID")]
        key: Option<String>,
        /// Only lines this recent: a duration (24h, 7d) or an RFC 3339 instant.
        #[arg(long, value_name = "WHEN")]
        since: Option<String>,
        /// Only lines of this action (create, update, rotate, apply, ...).
        #[arg(long)]
        action: Option<String>,
    },
    /// Show one key's metadata.
    Show {
        /// Key id, as `list` shows it.
        id: String,
    },
    /// Show, check or replace the store's policy (routes, plans, IP rules, ...: the
    /// plugin configuration without keys).
    Policy {
        #[command(subcommand)]
        action: PolicyAction,
    },
    /// Revoke a key for good (401 key_revoked).
    Revoke {
        /// Key id.
        id: String,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Suspend a key (403 key_suspended) until it is reactivated.
    Suspend {
        /// Key id.
        id: String,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Make a suspended key active again (a revoked key stays revoked).
    Reactivate {
        /// Key id.
        id: String,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Issue a new key with the same identity; the old key works until the grace ends,
    /// and the two spend one rate-limit budget.
    Rotate {
        /// Id of the key to replace.
        id: String,
        /// Rotate a revoked or expired key, or one already rotated in its grace period.
        #[arg(long)]
        force: bool,
        /// How long the old key keeps working: 90d, 24h, 30m or 3600s.
        #[arg(long, value_name = "DURATION", value_parser = store::parse_duration)]
        grace: i64,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Store the hashes of existing keys read from stdin.
    ///
    /// One key per line; blank lines and # comments are ignored. Env-file lines such as
    /// CLIENT_API_KEYS=a,b,c (quotes allowed) are split on commas, so a key containing a
    /// comma cannot be imported this way. Keys already in the store are skipped; if any
    /// line is malformed, nothing is imported.
    Import {
        #[command(flatten)]
        identity: Identity,
        /// Imported keys are named <PREFIX>-1, <PREFIX>-2, ...
        #[arg(long, value_name = "PREFIX", default_value = "legacy")]
        name_prefix: String,
        #[command(flatten)]
        expiry: Expiry,
        #[command(flatten)]
        apply: ApplyFlags,
    },
    /// Tell, offline, whether the key on stdin is accepted and as whom, or why not (exit
    /// 0 only when accepted); with --method and --path, what the filter would answer that
    /// request (exit 0 only for 200).
    Verify {
        /// The request's method.
        #[arg(long, requires = "path")]
        method: Option<String>,
        /// The request's path (and query).
        #[arg(long, requires = "method")]
        path: Option<String>,
        /// The client address the request comes from [default: unknown].
        #[arg(long, value_name = "IP", requires = "path")]
        client_ip: Option<std::net::IpAddr>,
    },
    /// Print the filter configuration rendered from the store, or the configuration of a
    /// shared rate-limit service for the store's plans.
    Render {
        /// What to print.
        #[arg(long, value_enum, default_value_t = Format::PluginJson)]
        format: Format,
    },
    /// Write the ECDS file Envoy watches (atomically, so Envoy reloads on the move), and
    /// confirm with Envoy's admin, when the store names it, that Envoy serves it.
    Apply {
        /// How long Envoy has to take the change up: 10s, 1m, ...
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "10s")]
        apply_timeout: Duration,
    },
    /// Name the admin interfaces (http://HOST:PORT) of the Envoys that watch the ECDS file,
    /// so that --apply confirms changes with each of them; or --add, --remove or --clear them.
    #[command(group(
        clap::ArgGroup::new("change")
            .required(true)
            .args(["urls", "add", "remove", "clear"])
    ))]
    SetAdmin {
        /// Exactly these admins, such as http://127.0.0.1:9901 (one Envoy, or every Envoy of
        /// a fleet watching the same file).
        #[arg(value_name = "URL", value_parser = parse_admin_url)]
        urls: Vec<String>,
        /// Name these admins too.
        #[arg(long, value_name = "URL", value_parser = parse_admin_url, num_args = 1..)]
        add: Vec<String>,
        /// Stop naming these admins.
        #[arg(long, value_name = "URL", value_parser = parse_admin_url, num_args = 1..)]
        remove: Vec<String>,
        /// Forget every admin: --apply then only writes the file.
        #[arg(long)]
        clear: bool,
    },
    /// Ask every Envoy admin the store names which version of the configuration it serves,
    /// and compare it with the store's (exit 0 only when every Envoy serves the store's).
    Status {
        /// How long each admin has to answer (they are asked at once).
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "2s")]
        timeout: Duration,
    },
    /// Per key of the store: when it was last used, and its requests and denials, from the
    /// counters of Envoy's admin (/stats/prometheus; the policy's "per_key_metrics": true);
    /// keys never used, or unused for --unused-for, are flagged. With several admins (a
    /// fleet) the counters are summed and the latest use kept.
    Usage {
        /// Envoy's admin interface (http://HOST:PORT), repeatable [default: the store's
        /// admins, envoy.admin].
        #[arg(long, value_name = "URL", value_parser = parse_admin_url, num_args = 1..)]
        envoy_admin: Vec<String>,
        /// Also flag keys last used longer ago than this: 30d, 12h, ...
        #[arg(long, value_name = "DURATION", value_parser = parse_unused_for)]
        unused_for: Option<i64>,
        /// How long each admin has to answer (they are asked at once).
        #[arg(long, value_name = "DURATION", value_parser = parse_timeout, default_value = "5s")]
        timeout: Duration,
    },
    /// Validate the store (or, given FILE, a plugin configuration) with the filter's rules.
    Check {
        /// A plugin configuration JSON file to check instead of the store.
        file: Option<PathBuf>,
    },
    /// Print the sha256:<hex> of the key on stdin.
    Hash,
    /// Check an Envoy configuration for the settings keygate relies on (exit 1 when one
    /// is unsafe, 2 when the file cannot be read).
    Doctor {
        /// The Envoy bootstrap (YAML or JSON), e.g. envoy/envoy.yaml.
        envoy_yaml: PathBuf,
    },
}

/// `--apply` and how long to wait for Envoy.
#[derive(Args, Clone, Copy)]
struct ApplyFlags {
    /// Then write the ECDS file, as `keygate apply` does, and confirm with Envoy's admin
    /// (when the store names it) that Envoy serves the change; if Envoy rejects it,
    /// nothing is changed.
    #[arg(long)]
    apply: bool,
    /// With --apply: how long Envoy has to take the change up.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = parse_timeout,
        default_value = "10s",
        requires = "apply"
    )]
    apply_timeout: Duration,
}

impl ApplyFlags {
    fn options(self) -> Option<ApplyOptions> {
        self.apply.then_some(ApplyOptions {
            timeout: self.apply_timeout,
        })
    }
}

fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs = store::parse_duration(s)?;
    if !(1..=3600).contains(&secs) {
        return Err(format!("{s:?}: from 1s to 1h"));
    }
    Ok(Duration::from_secs(secs.unsigned_abs()))
}

fn parse_unused_for(s: &str) -> Result<i64, String> {
    match store::parse_duration(s)? {
        0 => Err(format!("{s:?}: a duration over zero, such as 30d")),
        secs => Ok(secs),
    }
}

fn parse_admin_url(s: &str) -> Result<String, String> {
    store::admin::parse_url(s)
}

/// Who a new key is.
#[derive(Args)]
struct Identity {
    /// Role, one word such as client, miner or admin.
    #[arg(long)]
    role: String,
    /// Rate-limit plan [default: the policy's default_plan].
    #[arg(long)]
    plan: Option<String>,
    /// Scope granted to the key (repeatable).
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// Tenant the key is bound to.
    #[arg(long)]
    tenant: Option<String>,
    /// Client (customer) name.
    #[arg(long)]
    client: Option<String>,
    /// Address or CIDR block the key may be used from (repeatable) [default: any].
    #[arg(long = "allowed-ip", value_name = "CIDR")]
    allowed_ips: Vec<String>,
}

/// When a new key stops working [default: never].
#[derive(Args)]
struct Expiry {
    /// Lifetime: 90d, 24h, 30m or 3600s.
    #[arg(long, value_name = "DURATION", value_parser = store::parse_duration, conflicts_with = "expires_at")]
    expires_in: Option<i64>,
    /// Expiry instant (RFC 3339, e.g. 2027-01-01T00:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = time::parse_rfc3339)]
    expires_at: Option<i64>,
}

impl Expiry {
    fn at(&self, now: i64) -> Option<i64> {
        self.expires_in
            .map(|d| now.saturating_add(d))
            .or(self.expires_at)
    }
}

/// `list --status`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum StatusFilter {
    Active,
    Suspended,
    Revoked,
    Expired,
}

impl StatusFilter {
    fn state(self) -> State {
        match self {
            StatusFilter::Active => State::Active,
            StatusFilter::Suspended => State::Suspended,
            StatusFilter::Revoked => State::Revoked,
            StatusFilter::Expired => State::Expired,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The plugin configuration JSON.
    PluginJson,
    /// The ECDS resource (JSON, which is YAML) that `apply` writes.
    EnvoyEcds,
    /// envoyproxy/ratelimit's YAML configuration for the store's plans.
    EnvoyRatelimit,
    /// Limitador's limits file (YAML) for the store's plans.
    Limitador,
    /// The bootstrap's `stats_config` block (JSON, which is YAML) that turns keygate's
    /// metrics into labelled Prometheus series.
    EnvoyStatsTags,
}

impl Identity {
    fn new_key(
        &self,
        name: String,
        description: Option<String>,
        expires_at: Option<i64>,
    ) -> NewKey {
        NewKey {
            name,
            description,
            role: self.role.clone(),
            plan: self.plan.clone(),
            scopes: self.scopes.clone(),
            tenant: self.tenant.clone(),
            client: self.client.clone(),
            expires_at,
            allowed_ips: self.allowed_ips.clone(),
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            // Bare `keygate`: the list of commands is the useful answer.
            let _ = e.print();
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("keygate: {} (see --help)", one_line(&e));
            return ExitCode::from(2);
        }
    };
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("keygate: {e}");
            ExitCode::from(1)
        }
    }
}

/// Clap's message without its usage block, on one line.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let message = text.split("\n\n").next().unwrap_or_default();
    let joined = message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    joined
        .strip_prefix("error: ")
        .unwrap_or(&joined)
        .to_string()
}

fn run(cli: &Cli) -> Result<ExitCode, Error> {
    let path = cli.store.as_path();
    let now = store::unix_now();
    match &cli.command {
        Command::Init {
            ecds,
            wasm,
            prefix,
            policy,
            envoy_admin,
        } => {
            let mut new = Store::new(ecds.clone(), wasm.clone(), prefix.clone());
            new.set_admins(&AdminChange::Set(envoy_admin.clone()))?;
            if let Some(file) = policy {
                new.policy = store::read_policy(file)?;
            }
            store::init(path, &new, Some(&actor(cli, "init")?))?;
            let ecds = ecds.as_deref().map(|e| store::resolve(path, e));
            let mut text = format!(
                "created {}; ECDS file: {}",
                path.display(),
                ecds.as_ref().map_or_else(
                    || "none (keygate init --ecds PATH would enable apply)".into(),
                    |e| e.display().to_string()
                )
            );
            match new.envoy.admins.as_slice() {
                [] => {}
                [url] => text += &format!("; Envoy admin: {url}"),
                urls => text += &format!("; Envoy admins: {}", urls.join(", ")),
            }
            print(
                cli,
                &json!({"store": path, "ecds": ecds, "wasm": wasm, "admin": admin_json(&new.envoy.admins)}),
                &text,
            )?;
        }
        Command::Create {
            name,
            identity,
            description,
            expiry,
            apply,
        } => {
            let new = identity.new_key(name.clone(), description.clone(), expiry.at(now));
            let who = actor(cli, "create")?;
            // Warnings are said once the change is made: never for a refused one.
            let done = store::update_as(path, apply.options(), Some(&who), |s| {
                let warnings = store::identity_warnings(&s.policy, Some(&new.role), &new.scopes);
                let created = s.create(&new, now)?;
                let plan = created.record.effective_plan(&s.policy).map(str::to_string);
                Ok((created, plan, warnings))
            })?;
            let (created, plan, warnings) = &done.value;
            warn(warnings);
            let r = &created.record;
            let out = json!({
                "id": r.id, "key": created.key, "name": r.name, "prefix": r.prefix,
                "role": r.role, "plan": plan, "expires_at": r.expires_at,
            });
            let text = format!(
                "created key {} {:?} (role {}, plan {}, expires {})\n\
                 the key, shown only now (the store keeps its hash):\n{}",
                r.id,
                r.name,
                r.role,
                plan.as_deref().unwrap_or("none"),
                r.expires_at.as_deref().unwrap_or("never"),
                created.key
            );
            return committed(cli, &done, out, text);
        }
        Command::List {
            role,
            status,
            plan,
            client,
        } => {
            let mut s = store::load(path)?;
            let policy = s.policy.clone();
            s.keys.retain(|k| {
                role.as_ref().is_none_or(|r| &k.role == r)
                    && status.is_none_or(|st| k.state(now) == st.state())
                    && plan
                        .as_deref()
                        .is_none_or(|p| k.effective_plan(&policy) == Some(p))
                    && client.as_ref().is_none_or(|c| k.client.as_ref() == Some(c))
            });
            let filtered = role.is_some() || status.is_some() || plan.is_some() || client.is_some();
            list(cli, &s, now, filtered)?;
        }
        Command::Update {
            id,
            name,
            description,
            clear_description,
            role,
            scopes,
            add_scopes,
            remove_scopes,
            clear_scopes,
            plan,
            default_plan,
            client,
            clear_client,
            tenant,
            clear_tenant,
            allowed_ips,
            any_ip,
            expires_in,
            expires_at,
            no_expiry,
            apply,
        } => {
            let clear = |flag: bool, value: &Option<String>| match (flag, value) {
                (true, _) => Some(None),
                (false, Some(v)) => Some(Some(v.clone())),
                (false, None) => None,
            };
            let list = |flag: bool, values: &Vec<String>| match (flag, values.is_empty()) {
                (true, _) => Some(Vec::new()),
                (false, false) => Some(values.clone()),
                (false, true) => None,
            };
            let edit = store::KeyEdit {
                name: name.clone(),
                description: clear(*clear_description, description),
                role: role.clone(),
                scopes: list(*clear_scopes, scopes),
                add_scopes: add_scopes.clone(),
                remove_scopes: remove_scopes.clone(),
                plan: clear(*default_plan, plan),
                client: clear(*clear_client, client),
                tenant: clear(*clear_tenant, tenant),
                allowed_ips: list(*any_ip, allowed_ips),
                expires_at: if *no_expiry {
                    Some(None)
                } else {
                    expires_in
                        .map(|d| now.saturating_add(d))
                        .or(*expires_at)
                        .map(Some)
                },
            };
            return update(cli, id, &edit, apply.options(), now);
        }
        Command::Prune {
            older_than,
            dry_run,
            apply,
        } => return prune(cli, *older_than, *dry_run, apply.options(), now),
        Command::Audit { key, since, action } => {
            return audit(
                cli,
                key.as_deref(),
                since.as_deref(),
                action.as_deref(),
                now,
            )
        }
        Command::Show { id } => {
            let s = store::load(path)?;
            let key = s.find(id)?;
            print(cli, &describe(&s, key, now), &show_text(&s, key, now))?;
        }
        Command::Policy { action } => return policy(cli, action),
        Command::Revoke { id, apply } => {
            return transition(cli, id, Transition::Revoke, apply.options(), now)
        }
        Command::Suspend { id, apply } => {
            return transition(cli, id, Transition::Suspend, apply.options(), now)
        }
        Command::Reactivate { id, apply } => {
            return transition(cli, id, Transition::Reactivate, apply.options(), now)
        }
        Command::Rotate {
            id,
            force,
            grace,
            expiry,
            apply,
        } => {
            let who = actor(cli, "rotate")?;
            let done = store::update_as(path, apply.options(), Some(&who), |s| {
                s.rotate(id, *grace, expiry.at(now), *force, now)
            })?;
            let (new, old) = (&done.value.new, &done.value.old);
            let old_expiry = old.expires_at.as_deref().unwrap_or("never");
            // A forced rotation of a key that already stopped working says so.
            let old_works = match old.state(now) {
                store::State::Active => format!("{} keeps working until {old_expiry}", old.id),
                state => format!("{} stays {} (it stopped working)", old.id, state.as_str()),
            };
            let out = json!({
                "id": new.record.id, "key": new.key, "name": new.record.name,
                "prefix": new.record.prefix, "expires_at": new.record.expires_at,
                "old_id": old.id, "old_expires_at": old.expires_at,
                "rotated_from": old.id, "revision": done.revision,
            });
            let text = format!(
                "rotated {}: new key {} {:?}; {old_works}; the two share one rate-limit budget\n\
                 the new key, shown only now (the store keeps its hash):\n{}",
                old.id, new.record.id, new.record.name, new.key
            );
            return committed(cli, &done, out, text);
        }
        Command::Import {
            identity,
            name_prefix,
            expiry,
            apply,
        } => {
            let input = read_stdin()?;
            let input = String::from_utf8(input)
                .map_err(|_| Error::Other("standard input is not UTF-8 text".into()))?;
            let template = identity.new_key(String::new(), None, expiry.at(now));
            let who = actor(cli, "import")?;
            let done = store::update_as(path, apply.options(), Some(&who), |s| {
                let warnings =
                    store::identity_warnings(&s.policy, Some(&template.role), &template.scopes);
                let checksum_prefix = s
                    .policy
                    .key_format
                    .as_ref()
                    .filter(|f| f.checksum)
                    .map(|f| f.prefix.clone());
                let lines = store::parse_import(&input, checksum_prefix.as_deref())?;
                Ok((s.import(&lines, &template, name_prefix, now)?, warnings))
            })?;
            let (imported, warnings) = &done.value;
            warn(warnings);
            let added: Vec<Value> = imported
                .added
                .iter()
                .map(|(line, k)| json!({"line": line, "id": k.id, "name": k.name, "prefix": k.prefix}))
                .collect();
            let skipped: Vec<Value> = imported
                .skipped
                .iter()
                .map(|s| json!({"line": s.line, "prefix": s.prefix, "existing_id": s.existing_id}))
                .collect();
            let mut text = format!("imported {} keys", imported.added.len());
            for (line, k) in &imported.added {
                text += &format!("\n  line {line}: {} as {} ({})", k.prefix, k.id, k.name);
            }
            if !imported.skipped.is_empty() {
                text += &format!("\nskipped {} already in the store", imported.skipped.len());
                for s in &imported.skipped {
                    text += &format!("\n  line {}: {} is {}", s.line, s.prefix, s.existing_id);
                }
            }
            let out = json!({"imported": added, "skipped": skipped});
            return committed(cli, &done, out, text);
        }
        Command::Verify {
            method,
            path: req_path,
            client_ip,
        } => {
            let request = method.as_deref().zip(req_path.as_deref());
            return verify(cli, request, *client_ip, now);
        }
        Command::Render {
            format: Format::EnvoyStatsTags,
        } => {
            let block = json!({"stats_config": {"stats_tags": keygate::metrics::stats_tags()}});
            emit(&pretty(&block))?;
        }
        Command::Render {
            format: format @ (Format::EnvoyRatelimit | Format::Limitador),
        } => {
            // Only the plans matter: a store without keys yet renders too.
            let s = store::load(path)?;
            s.validate()?;
            let plans = fleet::plans(&s.policy);
            let yaml = match format {
                Format::EnvoyRatelimit => fleet::envoy_ratelimit_yaml(&plans),
                _ => fleet::limitador_yaml(&plans),
            };
            emit(yaml.trim_end())?;
        }
        Command::Render { format } => {
            let s = store::load(path)?;
            let rendered = s.render()?;
            let doc = match format {
                Format::EnvoyEcds => s.ecds_document(&rendered.plugin)?,
                _ => serde_json::to_value(&rendered.plugin)
                    .map_err(|e| Error::Other(format!("cannot serialise: {e}")))?,
            };
            emit(&pretty(&doc))?;
        }
        Command::Apply { apply_timeout } => {
            let applied = store::apply(
                path,
                ApplyOptions {
                    timeout: *apply_timeout,
                },
                Some(&actor(cli, "apply")?),
            )?;
            let mut out = json!({"ecds": applied.ecds, "keys": applied.keys});
            add_confirmation(&mut out, &applied);
            let text = format!(
                "{} keys, version {}\n{}",
                applied.keys,
                applied.version,
                apply_line(&applied)
            );
            print(cli, &out, &text)?;
        }
        Command::SetAdmin {
            urls,
            add,
            remove,
            clear,
        } => {
            let change = if *clear {
                AdminChange::Clear
            } else if !add.is_empty() {
                AdminChange::Add(add.clone())
            } else if !remove.is_empty() {
                AdminChange::Remove(remove.clone())
            } else {
                AdminChange::Set(urls.clone())
            };
            return set_admin(cli, &change);
        }
        Command::Status { timeout } => {
            let s = store::load(path)?;
            let status = fleet::status(path, &s, *timeout)?;
            print(cli, &status_json(&status), &status_text(&status))?;
            if !status.in_sync() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Usage {
            envoy_admin,
            unused_for,
            timeout,
        } => {
            let s = store::load(path)?;
            return usage(cli, &s, envoy_admin, *unused_for, *timeout, now);
        }
        Command::Doctor { envoy_yaml } => {
            let report = match keygate::doctor::doctor(envoy_yaml) {
                Ok(report) => report,
                Err(e) => {
                    eprintln!("keygate: {e}");
                    return Ok(ExitCode::from(2));
                }
            };
            print(cli, &report.to_json(), report.render_text().trim_end())?;
            if !report.is_safe() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Check { file: Some(file) } => {
            let bytes = std::fs::read(file)
                .map_err(|e| Error::Other(format!("cannot read {}: {e}", file.display())))?;
            let plugin = config::PluginConfig::from_json(&bytes)?;
            let problems = store::policy_problems(&plugin);
            if !problems.is_empty() {
                return report_problems(&file.display().to_string(), &problems);
            }
            let c = config::Config::compile(&plugin)?;
            let text = format!(
                "{}: valid ({} keys, {} routes)",
                file.display(),
                c.keys.len(),
                c.routes.len()
            );
            print(
                cli,
                &json!({"ok": true, "keys": c.keys.len(), "routes": c.routes.len()}),
                &text,
            )?;
        }
        Command::Check { file: None } => {
            let s = store::load(path)?;
            let problems = store::policy_problems(&s.plugin_with(&s.policy));
            if !problems.is_empty() {
                return report_problems(&path.display().to_string(), &problems);
            }
            s.render()?;
            let module = check_module(&s)?;
            let c = s.counts(now);
            let text = format!(
                "ok: {} keys ({} active, {} suspended, {} revoked, {} expired)",
                s.keys.len(),
                c.active,
                c.suspended,
                c.revoked,
                c.expired
            );
            let out = json!({
                "ok": true, "keys": s.keys.len(), "active": c.active,
                "suspended": c.suspended, "revoked": c.revoked, "expired": c.expired,
                "module": module,
            });
            print(cli, &out, &text)?;
        }
        Command::Hash => {
            let key = read_key()?;
            if !keys::well_formed(&key) {
                return Err(Error::Other(format!(
                    "a key must be {} to {} characters without control characters",
                    keys::MIN_KEY_CHARS,
                    keys::MAX_KEY_CHARS
                )));
            }
            let hash = keys::hash_string(&key);
            print(cli, &json!({"hash": hash}), &hash)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn print(cli: &Cli, json: &Value, text: &str) -> Result<(), Error> {
    if cli.json {
        emit(&pretty(json))
    } else {
        emit(text)
    }
}

/// Writes a line to stdout; a failure (e.g. a closed pipe) is an error, not a panic.
fn emit(text: &str) -> Result<(), Error> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| Error::Other(format!("cannot write to standard output: {e}")))
}

/// Prints a committed change and, with `--apply`, what became of it. A failed apply
/// never gets here: the change was undone and the error says so (so a new key is not
/// printed when no Envoy would accept it).
fn committed<T>(
    cli: &Cli,
    done: &Committed<T>,
    mut out: Value,
    mut text: String,
) -> Result<ExitCode, Error> {
    if let Some(mode) = done.tightened {
        note_tightened(&cli.store, mode);
    }
    note_upgraded(done);
    if let Some(applied) = &done.applied {
        if let Some(fields) = out.as_object_mut() {
            fields.insert("applied".into(), json!(applied.ecds));
        }
        add_confirmation(&mut out, applied);
        text += "\n";
        text += &apply_line(applied);
    }
    print(cli, &out, &text)?;
    Ok(ExitCode::SUCCESS)
}

/// What became of an applied change, in one line.
fn apply_line(applied: &Applied) -> String {
    let ecds = applied.ecds.display();
    let version = &applied.version;
    let mut confirmed: Vec<(&str, Duration)> = Vec::new();
    let mut unreachable: Vec<(&str, &str)> = Vec::new();
    for envoy in &applied.envoys {
        match envoy {
            Confirmation::Confirmed { admin, after } => confirmed.push((admin, *after)),
            Confirmation::Unreachable { admin, reason } => unreachable.push((admin, reason)),
        }
    }
    let slowest = confirmed.iter().map(|c| c.1).max().unwrap_or_default();
    let confirmed_at = confirmed.iter().map(|c| c.0).collect::<Vec<_>>().join(", ");
    let down = unreachable
        .iter()
        .map(|(admin, reason)| format!("{admin} ({reason})"))
        .collect::<Vec<_>>()
        .join(", ");
    match (confirmed.as_slice(), unreachable.as_slice()) {
        ([], []) => format!(
            "written to {ecds} (not confirmed: the store names no Envoy admin; keygate set-admin URL)"
        ),
        ([(admin, after)], []) => format!(
            "applied: Envoy at {admin} serves version {version} from {ecds} (confirmed after {})",
            store::seconds(*after)
        ),
        ([], [(admin, reason)]) => format!(
            "written to {ecds} (not confirmed: Envoy is not reachable at {admin}: {reason}; \
             the change is only written, and Envoy takes it up when it reads the file)"
        ),
        ([], _) => format!(
            "written to {ecds} (not confirmed: no Envoy is reachable: {down}; the change is only \
             written, and the Envoys take it up when they read the file)"
        ),
        (_, []) => format!(
            "applied: all {} Envoys serve version {version} from {ecds} (confirmed after {}: {confirmed_at})",
            confirmed.len(),
            store::seconds(slowest)
        ),
        (_, _) => format!(
            "applied: {} of {} Envoys serve version {version} from {ecds} (confirmed after {}: \
             {confirmed_at}); not confirmed at {down}: not reachable; the change is written, and \
             {} it up when {} the file",
            confirmed.len(),
            applied.envoys.len(),
            store::seconds(slowest),
            if unreachable.len() == 1 {
                "that Envoy takes"
            } else {
                "those Envoys take"
            },
            if unreachable.len() == 1 {
                "it reads"
            } else {
                "they read"
            },
        ),
    }
}

/// `envoy` in the JSON of an applied change: `status` (`confirmed` by every Envoy named,
/// `partial`, `unreachable`, `no_admin`), `seconds` (the longest wait), `admin` and
/// `reason` when the store names one Envoy (the shape from before fleets), and each
/// Envoy's answer under `envoys` when it names several.
fn add_confirmation(out: &mut Value, applied: &Applied) {
    let confirmed = applied.confirmed().count();
    let status = match (confirmed, applied.envoys.len()) {
        (_, 0) => "no_admin",
        (c, n) if c == n => "confirmed",
        (0, _) => "unreachable",
        _ => "partial",
    };
    let envoys: Vec<Value> = applied
        .envoys
        .iter()
        .map(|envoy| match envoy {
            Confirmation::Confirmed { admin, after } => {
                json!({"admin": admin, "status": "confirmed", "seconds": after.as_secs_f64()})
            }
            Confirmation::Unreachable { admin, reason } => {
                json!({"admin": admin, "status": "unreachable", "reason": reason})
            }
        })
        .collect();
    let seconds = applied
        .confirmed()
        .filter_map(|c| match c {
            Confirmation::Confirmed { after, .. } => Some(after.as_secs_f64()),
            Confirmation::Unreachable { .. } => None,
        })
        .reduce(f64::max);
    let (admin, reason) = match applied.envoys.as_slice() {
        [Confirmation::Unreachable { admin, reason }] => (Some(admin.as_str()), Some(reason)),
        [one] => (Some(one.admin()), None),
        _ => (None, None),
    };
    let mut envoy = json!({"status": status, "admin": admin, "seconds": seconds, "reason": reason});
    if envoys.len() > 1 {
        // A fleet: each Envoy's answer. A store naming one admin keeps the shape it had.
        envoy["envoys"] = Value::from(envoys);
    }
    if let Some(fields) = out.as_object_mut() {
        fields.insert("version".into(), json!(applied.version));
        fields.insert("envoy".into(), envoy);
    }
}

/// The store's `envoy.admin` as it is written: none, one URL, or a list.
fn admin_json(admins: &[String]) -> Value {
    match admins {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// What an Envoy admin says before a change: a status word and a sentence.
fn probe(
    answer: Result<Vec<store::admin::Subscription>, store::admin::GetError>,
) -> (&'static str, String) {
    match answer {
        Ok(subs) if subs.is_empty() => (
            "no_subscription",
            format!(
                "Envoy answers there, but has no ECDS subscription for the filter {:?}: \
                 --apply will fail until it has",
                store::FILTER_NAME
            ),
        ),
        Ok(subs) => {
            let versions: Vec<String> = subs
                .iter()
                .map(|s| {
                    if s.version.is_empty() {
                        "a configuration without a version".to_string()
                    } else {
                        format!("version {}", s.version)
                    }
                })
                .collect();
            (
                "ok",
                format!("Envoy answers there and serves {}", versions.join(", ")),
            )
        }
        Err(store::admin::GetError::Unreachable(why)) => (
            "unreachable",
            format!("Envoy is not reachable there now ({why}); --apply will only write the file until it is"),
        ),
        Err(store::admin::GetError::Failed(why)) => (
            "not_envoy",
            format!("something answers there, but not as Envoy's admin does ({why})"),
        ),
    }
}

/// `set-admin URL...`, `--add`, `--remove`, `--clear`; then says whether each Envoy the
/// store names answers.
fn set_admin(cli: &Cli, change: &AdminChange) -> Result<ExitCode, Error> {
    let who = actor(cli, "set-admin")?;
    let done = store::update_as(&cli.store, None, Some(&who), |s| {
        let previous = s.set_admins(change)?;
        Ok((previous, s.envoy.admins.clone()))
    })?;
    if let Some(mode) = done.tightened {
        note_tightened(&cli.store, mode);
    }
    note_upgraded(&done);
    let (previous, admins) = &done.value;
    let mut lines: Vec<String> = Vec::new();
    let count = |n: usize| match n {
        0 => "no Envoy admin".to_string(),
        1 => "1 Envoy admin".to_string(),
        n => format!("{n} Envoy admins"),
    };
    match change {
        AdminChange::Clear => {
            let text = match previous.as_slice() {
                [] => "the store named no Envoy admin".to_string(),
                old => format!(
                    "cleared the Envoy admin ({}); --apply now only writes the file",
                    old.join(", ")
                ),
            };
            print(
                cli,
                &json!({"admin": null, "previous": admin_json(previous), "admins": []}),
                &text,
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        AdminChange::Add(urls) => {
            let (new, old): (Vec<&String>, Vec<&String>) =
                urls.iter().partition(|u| !previous.contains(u));
            let mut text = String::new();
            if !new.is_empty() {
                text = format!(
                    "added {}",
                    new.iter()
                        .map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            if !old.is_empty() {
                if !text.is_empty() {
                    text += "; ";
                }
                text += &format!(
                    "already named: {}",
                    old.iter()
                        .map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            lines.push(format!("{text}; the store names {}", count(admins.len())));
        }
        AdminChange::Remove(urls) => {
            let mut text = format!(
                "removed {}; the store names {}",
                urls.join(", "),
                count(admins.len())
            );
            if admins.is_empty() {
                text += ": --apply now only writes the file";
            }
            lines.push(text);
        }
        AdminChange::Set(_) => {}
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    let answers = store::admin::subscriptions_of_all(admins, deadline);
    let mut each = Vec::new();
    for (url, answer) in admins.iter().zip(answers) {
        let (status, detail) = probe(answer);
        lines.push(format!("Envoy admin: {url}; {detail}"));
        each.push(json!({"admin": url, "status": status, "detail": detail}));
    }
    let mut out = json!({
        "admin": admin_json(admins), "previous": admin_json(previous), "admins": each,
    });
    // One admin: its answer at the top too, as before fleets.
    if let ([one], Some(fields)) = (each.as_slice(), out.as_object_mut()) {
        fields.insert("status".into(), one["status"].clone());
        fields.insert("detail".into(), one["detail"].clone());
    }
    print(cli, &out, &lines.join("\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// `keygate status --json`.
fn status_json(status: &Status) -> Value {
    let envoys: Vec<Value> = status
        .envoys
        .iter()
        .map(|envoy| {
            let error = match &envoy.state {
                EnvoyState::Answered(subs) if subs.is_empty() => Some(format!(
                    "no ECDS subscription for the filter {:?}",
                    store::FILTER_NAME
                )),
                EnvoyState::Answered(_) => None,
                EnvoyState::Unreachable(why) => Some(why.clone()),
                EnvoyState::NotEnvoy(why) => Some(format!("not Envoy's admin: {why}")),
            };
            json!({
                "admin": envoy.admin, "reachable": envoy.reachable(), "serves": envoy.serves(),
                "revisions": envoy.revisions(),
                "current": envoy.is_current(&status.version), "rejected": envoy.rejected(),
                "error": error,
            })
        })
        .collect();
    json!({
        "version": status.version, "revision": status.revision, "keys": status.keys,
        "ecds": status.ecds.as_ref().map(|f| json!({"path": f.path, "version": f.version})),
        "in_sync": status.in_sync(), "envoys": envoys,
    })
}

/// `keygate status`: the store's version, the ECDS file's, a table of the Envoys, and a
/// verdict.
fn status_text(status: &Status) -> String {
    let mut lines = vec![format!(
        "store: revision {}, version {} ({} key{})",
        status.revision,
        status.version,
        status.keys,
        if status.keys == 1 { "" } else { "s" }
    )];
    // The content decides, as for the Envoys: a newer revision of the same content is
    // what the file already holds.
    let same = |v: &str| store::content_of(v) == store::content_of(&status.version);
    let file_differs = status
        .ecds
        .as_ref()
        .is_some_and(|f| !f.version.as_deref().is_some_and(same));
    lines.push(match &status.ecds {
        None => "ECDS file: none named (envoy.ecds)".to_string(),
        Some(f) => match &f.version {
            None => format!(
                "ECDS file: {} is not written yet (keygate apply writes it)",
                f.path.display()
            ),
            Some(v) if same(v) => {
                format!("ECDS file: {} holds version {v}", f.path.display())
            }
            Some(v) => format!(
                "ECDS file: {} holds version {v}, not the store's (keygate apply writes it)",
                f.path.display()
            ),
        },
    });
    let header = [
        "ENVOY",
        "REACHABLE",
        "REVISION",
        "SERVES",
        "CURRENT",
        "NOTE",
    ]
    .map(String::from);
    let rows: Vec<[String; 6]> = status
        .envoys
        .iter()
        .map(|envoy| {
            let serves = envoy.serves();
            let serves = if serves.is_empty() {
                "-".to_string()
            } else {
                serves
                    .iter()
                    .map(|v| if v.is_empty() { "(no version)" } else { v })
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let note = match &envoy.state {
                EnvoyState::Answered(subs) if subs.is_empty() => format!(
                    "no ECDS subscription for the filter {:?}",
                    store::FILTER_NAME
                ),
                EnvoyState::Answered(_) => match envoy.rejected() {
                    0 => String::new(),
                    1 => "1 update rejected since it started".to_string(),
                    n => format!("{n} updates rejected since it started"),
                },
                EnvoyState::Unreachable(why) => why.clone(),
                EnvoyState::NotEnvoy(why) => format!("not Envoy's admin: {why}"),
            };
            let yes = |b: bool| if b { "yes" } else { "no" }.to_string();
            let revisions = envoy.revisions();
            let revision = if revisions.is_empty() {
                "-".to_string()
            } else {
                let each: Vec<String> = revisions
                    .iter()
                    .map(|r| r.map_or_else(|| "?".to_string(), |r| format!("r{r}")))
                    .collect();
                format!("{} of r{}", each.join(","), status.revision)
            };
            [
                envoy.admin.clone(),
                yes(envoy.reachable()),
                revision,
                serves,
                yes(envoy.is_current(&status.version)),
                note,
            ]
        })
        .collect();
    let mut widths = [0usize; 6];
    for row in std::iter::once(&header).chain(&rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        lines.push(cells.join("  ").trim_end().to_string());
    }
    let n = status.envoys.len();
    let behind = status
        .envoys
        .iter()
        .filter(|e| !e.is_current(&status.version))
        .count();
    lines.push(if behind == 0 {
        format!(
            "in sync: {} the store's version",
            if n == 1 {
                "the Envoy serves".to_string()
            } else {
                format!("all {n} Envoys serve")
            }
        )
    } else {
        format!(
            "not in sync: {behind} of {n} Envoys do not serve the store's version{}",
            if file_differs {
                " (keygate apply writes it)"
            } else {
                ""
            }
        )
    });
    lines.join("\n")
}

/// `check`'s look at the module the store names: an error when it is there and is not
/// Wasm, a warning on stderr when it is not there (it may be a path in a container).
fn check_module(s: &Store) -> Result<Value, Error> {
    match s.module() {
        Module::Unset => Ok(json!({"status": "unset"})),
        Module::Valid(file) => Ok(json!({"status": "ok", "path": file})),
        Module::Missing(file) => {
            eprintln!(
                "keygate: warning: the module {} (envoy.wasm) does not exist here; fine if it is \
                 a path inside Envoy's container or from Envoy's working directory, and it exists there",
                file.display()
            );
            Ok(json!({"status": "missing", "path": file}))
        }
        Module::Unreadable(file, why) => {
            eprintln!(
                "keygate: warning: the module {} (envoy.wasm) cannot be read here ({why}); \
                 Envoy, perhaps running as another user, must be able to read it",
                file.display()
            );
            Ok(json!({"status": "unreadable", "path": file, "reason": why}))
        }
        Module::NotWasm(file, why) => Err(Error::Other(format!(
            "{} (envoy.wasm) is not a Wasm module ({why}), and Envoy would reject the \
             configuration; point envoy.wasm at the filter's keygate.wasm",
            file.display()
        ))),
    }
}

/// Said once, by the command that upgrades a store's format.
fn note_upgraded<T>(done: &Committed<T>) {
    if let Some((from, backup)) = &done.upgraded {
        eprintln!(
            "keygate: note: upgraded the store from format version {from} to {}; the version {from} file is kept as {}",
            store::VERSION,
            backup.display()
        );
    }
}

/// Who the audit log names for `action`: `--actor`, else the OS user.
fn actor(cli: &Cli, action: &str) -> Result<store::audit::Actor, Error> {
    store::audit::Actor::new(cli.actor.as_deref(), action)
}

/// Prints warnings on stderr, one a line (each starts with `warning:`).
fn warn(lines: &[String]) {
    for line in lines {
        eprintln!("{line}");
    }
}

/// Fails with the problems of a configuration: one as the usual one-line error, several
/// one a line (then a count), exit 1.
fn report_problems(what: &str, problems: &[config::ConfigError]) -> Result<ExitCode, Error> {
    if let [one] = problems {
        return Err(Error::Invalid(one.clone()));
    }
    for p in problems {
        eprintln!("keygate: {what}: {p}");
    }
    eprintln!(
        "keygate: {what}: {} problem{}; nothing was changed",
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    Ok(ExitCode::from(1))
}

/// `keygate update ID ...`.
fn update(
    cli: &Cli,
    id: &str,
    edit: &store::KeyEdit,
    apply: Option<ApplyOptions>,
    now: i64,
) -> Result<ExitCode, Error> {
    let who = actor(cli, "update")?;
    let done = store::update_as(&cli.store, apply, Some(&who), |s| {
        let (before, after) = s.edit(id, edit, now)?;
        // Checked here too (update_as validates again), to name the field by the key's id.
        if let Some(first) = store::policy_problems(&s.plugin_with(&s.policy)).first() {
            return Err(Error::Invalid(first.clone()));
        }
        let added: Vec<String> = after
            .scopes
            .iter()
            .filter(|sc| !before.scopes.contains(sc))
            .cloned()
            .collect();
        // Only a new role and new scopes are warned about.
        let role = (before.role != after.role).then_some(after.role.as_str());
        let warnings = store::identity_warnings(&s.policy, role, &added);
        let changes = store::audit::diff_keys(&before, &after);
        Ok((describe(s, &after, now), changes, warnings))
    })?;
    let (mut out, changes, warnings) = done.value.clone();
    warn(&warnings);
    let text = if changes.is_empty() {
        format!("{id}: nothing changed (it already is as asked)")
    } else {
        let mut text = format!("updated {id} (revision {}):", done.revision);
        for (field, c) in &changes {
            text += &format!("\n  {field}: {} -> {}", short(&c.old), short(&c.new));
        }
        text
    };
    if let Some(fields) = out.as_object_mut() {
        fields.insert("changed".into(), json!(!changes.is_empty()));
        fields.insert("changes".into(), json!(changes));
        fields.insert("revision".into(), json!(done.revision));
    }
    committed(cli, &done, out, text)
}

/// A JSON value in one short line: strings bare, absent as "-".
fn short(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a.iter().map(short).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `keygate prune --older-than D [--dry-run]`.
fn prune(
    cli: &Cli,
    older_than: i64,
    dry_run: bool,
    apply: Option<ApplyOptions>,
    now: i64,
) -> Result<ExitCode, Error> {
    let row = |k: &StoredKey, state: State, since: i64| -> (Value, String) {
        let verb = match state {
            State::Expired => "expired",
            _ => "revoked",
        };
        let at = time::format_rfc3339(since);
        (
            json!({"id": k.id, "name": k.name, "status": state.as_str(), "since": at}),
            format!("  {} {:?}: {verb} at {at}", k.id, k.name),
        )
    };
    if dry_run {
        let s = store::load(&cli.store)?;
        let found: Vec<(Value, String)> = s
            .prunable(older_than, now)
            .into_iter()
            .map(|(k, st, t)| row(k, st, t))
            .collect();
        let mut text = format!(
            "would remove {} key{} (dry run; nothing was changed)",
            found.len(),
            if found.len() == 1 { "" } else { "s" }
        );
        for (_, line) in &found {
            text += &format!("\n{line}");
        }
        let (kept, kept_text) = kept_for_successors(&s, older_than, now);
        text += &kept_text;
        let keys: Vec<&Value> = found.iter().map(|(v, _)| v).collect();
        print(
            cli,
            &json!({"dry_run": true, "removed": keys, "kept": kept}),
            &text,
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let who = actor(cli, "prune")?;
    let done = store::update_as(&cli.store, apply, Some(&who), |s| {
        let found: Vec<(Value, String)> = s
            .prunable(older_than, now)
            .into_iter()
            .map(|(k, st, t)| row(k, st, t))
            .collect();
        let kept = kept_for_successors(s, older_than, now);
        s.prune(older_than, now);
        Ok((found, kept))
    })?;
    let (found, (kept, kept_text)) = &done.value;
    let mut text = format!(
        "removed {} key{}",
        found.len(),
        if found.len() == 1 { "" } else { "s" }
    );
    for (_, line) in found {
        text += &format!("\n{line}");
    }
    text += kept_text;
    if !found.is_empty() && done.applied.is_none() {
        text += "\nEnvoy keeps them until the next keygate apply";
    }
    let keys: Vec<&Value> = found.iter().map(|(v, _)| v).collect();
    let out = json!({"dry_run": false, "removed": keys, "kept": kept, "revision": done.revision});
    committed(cli, &done, out, text)
}

/// The keys `prune` keeps because a successor still spends their budget: as JSON, and as
/// text lines.
fn kept_for_successors(s: &Store, older_than: i64, now: i64) -> (Vec<Value>, String) {
    let mut text = String::new();
    let kept = s
        .kept_for_successors(older_than, now)
        .into_iter()
        .map(|(k, by)| {
            text += &format!(
                "\nkept {} ({}): {by}, rotated from it, still spends its rate-limit budget",
                k.id,
                k.state(now).as_str()
            );
            json!({"id": k.id, "state": k.state(now).as_str(), "successor": by})
        })
        .collect();
    (kept, text)
}

/// `keygate audit [--key ID] [--since WHEN] [--action A]`.
fn audit(
    cli: &Cli,
    key: Option<&str>,
    since: Option<&str>,
    action: Option<&str>,
    now: i64,
) -> Result<ExitCode, Error> {
    let since = match since {
        None => None,
        Some(text) => Some(
            store::parse_duration(text)
                .map(|d| now.saturating_sub(d))
                .or_else(|_| time::parse_rfc3339(text))
                .map_err(|_| {
                    Error::Other(format!(
                        "--since: {text:?} is neither a duration such as 24h or 7d nor an RFC 3339 instant"
                    ))
                })?,
        ),
    };
    let lines: Vec<store::audit::Line> = store::audit::read(&cli.store)?
        .into_iter()
        .filter(|l| key.is_none_or(|k| l.key.as_deref() == Some(k)))
        .filter(|l| action.is_none_or(|a| l.action == a))
        .filter(|l| since.is_none_or(|t| time::parse_rfc3339(&l.time).is_ok_and(|at| at >= t)))
        .collect();
    if cli.json {
        let out = serde_json::to_value(&lines)
            .map_err(|e| Error::Other(format!("cannot serialise: {e}")))?;
        emit(&pretty(&out))?;
        return Ok(ExitCode::SUCCESS);
    }
    if lines.is_empty() {
        emit(&format!(
            "no audit lines{} in {}",
            if key.is_some() || since.is_some() || action.is_some() {
                " match"
            } else {
                ""
            },
            store::audit::path_of(&cli.store).display()
        ))?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = lines
        .iter()
        .map(|l| {
            let mut what: Vec<String> = l
                .changes
                .iter()
                .map(|(f, c)| format!("{f}: {} -> {}", short(&c.old), short(&c.new)))
                .collect();
            if let Some(a) = &l.apply {
                what.push(format!(
                    "version {} {}",
                    a.version,
                    if a.confirmed {
                        "confirmed".to_string()
                    } else if a.envoys.is_empty() {
                        "written (no Envoy admin named)".to_string()
                    } else {
                        "written (not confirmed by every Envoy)".to_string()
                    }
                ));
            }
            vec![
                l.time.clone(),
                l.actor.clone(),
                l.action.clone(),
                format!("r{}", l.revision),
                l.key.clone().unwrap_or_else(|| "-".into()),
                what.join("; "),
            ]
        })
        .collect();
    emit(&table(&["TIME", "ACTOR", "ACTION", "REV", "KEY", "CHANGES"], &rows).join("\n"))?;
    Ok(ExitCode::SUCCESS)
}

/// Said once, by the rewrite that makes an old world-readable store owner-only: a
/// backup job or another user that read the store learns why it no longer can.
fn note_tightened(path: &std::path::Path, mode: u32) {
    eprintln!(
        "keygate: note: {} was mode {mode:03o}, readable by other users; keygate keeps its store \
         at 0600 (it holds the digests of imported keys), and has set it so",
        path.display()
    );
}

/// Reads a policy file: a plugin configuration without keys (they live in the store).
fn read_policy_file(file: &std::path::Path) -> Result<keygate::config::PluginConfig, Error> {
    let policy = store::read_policy(file)?;
    if !policy.keys.is_empty() || !policy.key_sets.is_empty() {
        return Err(Error::Other(format!(
            "invalid policy {}: keys: a policy holds no keys (keys are managed with keygate create, import, revoke ...)",
            file.display()
        )));
    }
    Ok(policy)
}

/// Every problem of `policy` with the store's keys (a store without keys yet: the policy
/// on its own, as the store is validated).
fn policy_problems_of(s: &Store, policy: &config::PluginConfig) -> Vec<config::ConfigError> {
    let plugin = s.plugin_with(policy);
    if plugin.keys.is_empty() {
        config::policy_problems(&plugin)
    } else {
        store::policy_problems(&plugin)
    }
}

/// Warnings for the store's usable keys whose role or scopes no route of `policy` uses.
fn key_warnings(s: &Store, policy: &config::PluginConfig) -> Vec<String> {
    let now = store::unix_now();
    let mut out: Vec<String> = Vec::new();
    for k in s.keys.iter().filter(|k| k.state(now) == State::Active) {
        for w in store::identity_warnings(policy, Some(&k.role), &k.scopes) {
            let line = format!("{w} (key {})", k.id);
            out.push(line);
        }
    }
    out
}

fn policy(cli: &Cli, action: &PolicyAction) -> Result<ExitCode, Error> {
    match action {
        PolicyAction::Show => {
            let s = store::load(&cli.store)?;
            let mut value = serde_json::to_value(&s.policy)
                .map_err(|e| Error::Other(format!("cannot serialise: {e}")))?;
            // The keys are the store's, not the policy's.
            if let Some(fields) = value.as_object_mut() {
                fields.remove("keys");
            }
            emit(&pretty(&value))?;
        }
        PolicyAction::Check { file } => {
            let s = store::load(&cli.store)?;
            let policy = read_policy_file(file)?;
            let problems = policy_problems_of(&s, &policy);
            if !problems.is_empty() {
                return report_problems(&file.display().to_string(), &problems);
            }
            warn(&key_warnings(&s, &policy));
            print(
                cli,
                &json!({"file": file.display().to_string(), "valid": true}),
                &format!(
                    "{}: valid with the store's {} keys",
                    file.display(),
                    s.keys.len()
                ),
            )?;
        }
        PolicyAction::Set { file, apply } => {
            let policy = read_policy_file(file)?;
            let s = store::load(&cli.store)?;
            let problems = policy_problems_of(&s, &policy);
            if !problems.is_empty() {
                return report_problems(&file.display().to_string(), &problems);
            }
            let who = actor(cli, "policy-set")?;
            let done = store::update_as(&cli.store, apply.options(), Some(&who), |s| {
                let changed = s.policy != policy;
                warn(&key_warnings(s, &policy));
                s.policy = policy;
                Ok(changed)
            })?;
            let changed = done.value;
            let text = if changed {
                format!(
                    "policy replaced from {} (revision {})",
                    file.display(),
                    done.revision
                )
            } else {
                format!("the policy is already {}", file.display())
            };
            return committed(
                cli,
                &done,
                json!({"changed": changed, "revision": done.revision}),
                text,
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn transition(
    cli: &Cli,
    id: &str,
    to: Transition,
    apply: Option<ApplyOptions>,
    now: i64,
) -> Result<ExitCode, Error> {
    let action = match to {
        Transition::Revoke => "revoke",
        Transition::Suspend => "suspend",
        Transition::Reactivate => "reactivate",
    };
    let who = actor(cli, action)?;
    let done = store::update_as(&cli.store, apply, Some(&who), |s| {
        let changed = s.transition(id, to, now)?;
        Ok((describe(s, &changed.record, now), changed.changed))
    })?;
    let (mut out, changed) = done.value.clone();
    let verb = match to {
        Transition::Revoke => "revoked",
        Transition::Suspend => "suspended",
        Transition::Reactivate => "reactivated",
    };
    let text = if changed {
        format!("{verb} {id}")
    } else {
        format!(
            "{id} was already {}",
            if to == Transition::Reactivate {
                "active"
            } else {
                verb
            }
        )
    };
    if let Some(fields) = out.as_object_mut() {
        fields.insert("changed".into(), json!(changed));
    }
    committed(cli, &done, out, text)
}

/// A key's metadata for output: everything but its hash; `status` is its state now.
fn describe(s: &Store, key: &StoredKey, now: i64) -> Value {
    json!({
        "id": key.id, "name": key.name, "description": key.description, "prefix": key.prefix,
        "status": key.state(now).as_str(), "role": key.role, "client": key.client,
        "tenant": key.tenant, "scopes": key.scopes, "plan": key.effective_plan(&s.policy),
        "allowed_ips": key.allowed_ips, "created_at": key.created_at,
        "expires_at": key.expires_at, "revoked_at": key.revoked_at,
        "rotated_from": key.rotated_from, "shares_quota_with": s.budget_root(&key.id),
    })
}

fn show_text(s: &Store, key: &StoredKey, now: i64) -> String {
    let list = |v: &[String]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(", ")
        }
    };
    let rows = [
        ("id", key.id.clone()),
        ("name", key.name.clone()),
        (
            "description",
            key.description.clone().unwrap_or_else(|| "-".into()),
        ),
        ("prefix", key.prefix.clone()),
        ("status", key.state(now).as_str().into()),
        ("role", key.role.clone()),
        ("client", key.client.clone().unwrap_or_else(|| "-".into())),
        ("tenant", key.tenant.clone().unwrap_or_else(|| "-".into())),
        ("scopes", list(&key.scopes)),
        (
            "plan",
            key.effective_plan(&s.policy).unwrap_or("none").into(),
        ),
        (
            "allowed_ips",
            if key.allowed_ips.is_empty() {
                "any".into()
            } else {
                list(&key.allowed_ips)
            },
        ),
        ("created_at", key.created_at.clone()),
        (
            "expires_at",
            key.expires_at.clone().unwrap_or_else(|| "never".into()),
        ),
        (
            "revoked_at",
            key.revoked_at.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "rotated_from",
            key.rotated_from.clone().unwrap_or_else(|| "-".into()),
        ),
        (
            "budget",
            s.budget_root(&key.id).map_or_else(
                || "its own".to_string(),
                |root| format!("shared with {root}"),
            ),
        ),
    ];
    rows.iter()
        .map(|(k, v)| format!("{:<12} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Lines of a table: a header and rows, each column as wide as its widest cell, two
/// spaces apart, without trailing blanks.
fn table(header: &[&str], rows: &[Vec<String>]) -> Vec<String> {
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    let mut widths = vec![0usize; header.len()];
    for row in std::iter::once(&header).chain(rows) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    std::iter::once(&header)
        .chain(rows)
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, &w)| format!("{cell:<w$}"))
                .collect();
            cells.join("  ").trim_end().to_string()
        })
        .collect()
}

/// What `list` knows of last uses, when the store names Envoy admins.
enum LastUsed {
    /// The merged usage of the Envoys that answered.
    Known(Usage),
    /// No Envoy answered, or none exports per-key series: every cell says "?".
    Unknown,
}

/// How long `list` waits for the admins: a listing should not hang on a dead Envoy.
const LIST_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the store's policy turns the filter's per-key series on.
fn per_key_metrics(s: &Store) -> bool {
    serde_json::to_value(&s.policy)
        .ok()
        .and_then(|v| v.get("per_key_metrics").and_then(Value::as_bool))
        .unwrap_or(false)
}

/// Why an Envoy's page names no key: its bootstrap has no tag extraction for keygate.
fn untagged(url: &str) -> String {
    format!(
        "Envoy at {url} exports keygate's series without labels (flat names): its bootstrap \
         lacks keygate's stats_config.stats_tags (see envoy/envoy.yaml), so no key id can be read"
    )
}

/// An admin's failure, in words.
fn admin_error(e: &GetError) -> String {
    match e {
        GetError::Unreachable(why) => why.clone(),
        GetError::Failed(why) => format!("not Envoy's admin: {why}"),
    }
}

/// Last uses for `list`: `None` when the store names no admin. Says on stderr, in one
/// line, what it could not learn.
fn last_used_for_list(s: &Store) -> Option<LastUsed> {
    if s.envoy.admins.is_empty() {
        return None;
    }
    let answers = usage::fetch_all(&s.envoy.admins, Instant::now() + LIST_TIMEOUT);
    let mut merged = Usage::default();
    let mut failed: Vec<String> = Vec::new();
    for (url, answer) in s.envoy.admins.iter().zip(&answers) {
        match answer {
            Ok(u) => merged.merge(u),
            Err(e) => failed.push(format!("{url} ({})", admin_error(e))),
        }
    }
    let total = s.envoy.admins.len();
    if failed.len() == total {
        eprintln!(
            "keygate: note: LAST USED unknown: {}: {}",
            if total == 1 {
                "the Envoy admin did not answer"
            } else {
                "no Envoy admin answered"
            },
            failed.join(", ")
        );
        return Some(LastUsed::Unknown);
    }
    if let Some(url) = s
        .envoy
        .admins
        .iter()
        .zip(&answers)
        .find_map(|(url, answer)| matches!(answer, Ok(u) if u.untagged).then_some(url))
    {
        eprintln!("keygate: note: LAST USED unknown: {}", untagged(url));
        return Some(LastUsed::Unknown);
    }
    if !merged.per_key() && !per_key_metrics(s) {
        eprintln!(
            "keygate: note: LAST USED unknown: Envoy exports no per-key series; \"per_key_metrics\": true \
             in the policy turns them on (keygate policy set)"
        );
        return Some(LastUsed::Unknown);
    }
    if !failed.is_empty() {
        eprintln!(
            "keygate: note: LAST USED from {} of {total} Envoys; not answering: {}",
            total - failed.len(),
            failed.join(", ")
        );
    }
    Some(LastUsed::Known(merged))
}

fn list(cli: &Cli, s: &Store, now: i64, filtered: bool) -> Result<(), Error> {
    let last_used = last_used_for_list(s);
    let of = |id: &str| -> Option<&KeyUsage> {
        match &last_used {
            Some(LastUsed::Known(u)) => u.keys.get(id),
            _ => None,
        }
    };
    if cli.json {
        let out: Vec<Value> = s
            .keys
            .iter()
            .map(|k| {
                json!({
                    "id": k.id, "name": k.name, "prefix": k.prefix, "role": k.role,
                    "plan": k.effective_plan(&s.policy), "status": k.state(now).as_str(),
                    "client": k.client, "tenant": k.tenant, "scopes": k.scopes,
                    "created_at": k.created_at, "expires_at": k.expires_at,
                    "rotated_from": k.rotated_from,
                    "last_used": of(&k.id).and_then(usage::last_used_rfc3339),
                })
            })
            .collect();
        return emit(&pretty(&Value::from(out)));
    }
    if s.keys.is_empty() && filtered {
        return emit(&format!("no keys match in {}", cli.store.display()));
    }
    if s.keys.is_empty() {
        return emit(&format!(
            "no keys in {}; add one with keygate create",
            cli.store.display()
        ));
    }
    let cell = |id: &str| -> String {
        match (&last_used, of(id)) {
            (
                Some(LastUsed::Known(_)),
                Some(KeyUsage {
                    last_used: Some(at),
                    ..
                }),
            ) => usage::ago(now, *at),
            (Some(LastUsed::Known(_)), Some(k)) if k.used() => "?".into(),
            (Some(LastUsed::Known(_)), _) => "never".into(),
            _ => "?".into(),
        }
    };
    let rows: Vec<Vec<String>> = s
        .keys
        .iter()
        .map(|k| {
            let mut row = vec![
                k.id.clone(),
                k.name.clone(),
                k.prefix.clone(),
                k.role.clone(),
                k.effective_plan(&s.policy).unwrap_or("-").into(),
                k.state(now).as_str().into(),
                k.client.clone().unwrap_or_else(|| "-".into()),
                k.tenant.clone().unwrap_or_else(|| "-".into()),
                if k.scopes.is_empty() {
                    "-".into()
                } else {
                    k.scopes.join(",")
                },
                k.created_at.clone(),
                k.expires_at.clone().unwrap_or_else(|| "never".into()),
            ];
            if last_used.is_some() {
                row.push(cell(&k.id));
            }
            row
        })
        .collect();
    let mut header = vec![
        "ID", "NAME", "PREFIX", "ROLE", "PLAN", "STATUS", "CLIENT", "TENANT", "SCOPES", "CREATED",
        "EXPIRES",
    ];
    if last_used.is_some() {
        header.push("LAST USED");
    }
    let lines = table(&header, &rows);
    emit(&lines.join("\n"))
}

/// `keygate usage`.
fn usage(
    cli: &Cli,
    s: &Store,
    flags: &[String],
    unused_for: Option<i64>,
    timeout: Duration,
    now: i64,
) -> Result<ExitCode, Error> {
    let mut admins: Vec<String> = Vec::new();
    for url in if flags.is_empty() {
        &s.envoy.admins
    } else {
        flags
    } {
        if !admins.contains(url) {
            admins.push(url.clone());
        }
    }
    if admins.is_empty() {
        return Err(Error::Other(
            "no Envoy admin to ask: give --envoy-admin http://HOST:PORT, or name the store's \
             with keygate set-admin URL [URL ...]"
                .into(),
        ));
    }
    let answers = usage::fetch_all(&admins, Instant::now() + timeout);
    let mut merged = Usage::default();
    let mut envoys: Vec<Value> = Vec::new();
    let mut answered: Vec<(&str, Option<i64>)> = Vec::new();
    let mut failed: Vec<(&str, String)> = Vec::new();
    for (url, answer) in admins.iter().zip(&answers) {
        match answer {
            Ok(u) => {
                merged.merge(u);
                answered.push((url, u.uptime));
                envoys.push(json!({
                    "admin": url, "reachable": true, "uptime_seconds": u.uptime,
                    "keygate_metrics": u.keygate, "error": null,
                }));
            }
            Err(e) => {
                let why = admin_error(e);
                envoys.push(json!({
                    "admin": url, "reachable": matches!(e, GetError::Failed(_)),
                    "uptime_seconds": null, "keygate_metrics": null, "error": why,
                }));
                failed.push((url, why));
            }
        }
    }
    if answered.is_empty() {
        let list = failed
            .iter()
            .map(|(url, why)| format!("{url} ({why})"))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(Error::Other(format!(
            "no usage: {}: {list}",
            if admins.len() == 1 {
                "the Envoy admin did not answer"
            } else {
                "no Envoy admin answered"
            }
        )));
    }
    for (url, why) in &failed {
        eprintln!(
            "keygate: warning: Envoy admin {url} did not answer ({why}); usage is from the other {}",
            if answered.len() == 1 {
                "Envoy".to_string()
            } else {
                format!("{} Envoys", answered.len())
            }
        );
    }
    for (url, answer) in admins.iter().zip(&answers) {
        match answer {
            Ok(u) if !u.keygate => eprintln!(
                "keygate: warning: Envoy at {url} exports no keygate metrics: is the keygate filter loaded there?"
            ),
            Ok(u) if u.untagged => eprintln!("keygate: warning: {}", untagged(url)),
            _ => {}
        }
    }
    if merged.keygate && !merged.untagged && !merged.per_key() {
        eprintln!(
            "keygate: note: Envoy's counters hold no per-key series: the policy's \"per_key_metrics\" \
             is off (keygate policy set turns it on), or no key was used since Envoy started"
        );
    }
    let report = usage::report(s, &merged, now, unused_for);
    let ids = |flag: Flag| -> Vec<&str> {
        report
            .keys
            .iter()
            .filter(|r| r.flag == Some(flag))
            .map(|r| r.id.as_str())
            .collect()
    };
    let (never, unused) = (ids(Flag::NeverUsed), ids(Flag::Unused));
    let unused_text = unused_for.map(usage::duration_text);
    if cli.json {
        let key_json = |r: &usage::Row| -> Value {
            let mut v = json!({
                "id": r.id,
                "last_used": usage::last_used_rfc3339(&r.usage),
                "last_used_unix": r.usage.last_used,
                "allowed": r.usage.counts.allowed,
                "denied": r.usage.counts.denied_total(),
                "denials": r.usage.counts.denied,
            });
            if let Some(fields) = v.as_object_mut() {
                if let Some(name) = &r.name {
                    fields.insert("name".into(), json!(name));
                }
                if let Some(state) = r.state {
                    fields.insert("status".into(), json!(state.as_str()));
                    fields.insert("flag".into(), json!(r.flag.map(Flag::as_str)));
                }
                if let Some(set) = &r.key_set {
                    fields.insert("key_set".into(), json!(set));
                }
            }
            v
        };
        let totals = merged.totals.as_ref().map(
            |t| json!({"allowed": t.allowed, "denied": t.denied_total(), "denials": t.denied}),
        );
        let out = json!({
            "now": time::format_rfc3339(now),
            "keys": report.keys.iter().map(key_json).collect::<Vec<_>>(),
            "never_used": never,
            "unused_for": unused_text,
            "unused": unused,
            "removed": report.removed.iter().map(key_json).collect::<Vec<_>>(),
            "key_sets": report.key_sets.iter().map(key_json).collect::<Vec<_>>(),
            "per_key_series": merged.per_key(),
            "dropped": merged.dropped,
            "totals": totals,
            "envoys": envoys,
        });
        emit(&pretty(&out))?;
        return Ok(ExitCode::SUCCESS);
    }
    let last = |u: &KeyUsage| -> [String; 2] {
        match u.last_used {
            Some(at) => [usage::ago(now, at), time::format_rfc3339(at)],
            None if u.used() => ["?".into(), "-".into()],
            None => ["never".into(), "-".into()],
        }
    };
    let denials = |u: &KeyUsage| -> String {
        if u.counts.denied.is_empty() {
            "-".into()
        } else {
            u.counts
                .denied
                .iter()
                .map(|(reason, n)| format!("{reason}={n}"))
                .collect::<Vec<_>>()
                .join(",")
        }
    };
    let rows: Vec<Vec<String>> = report
        .keys
        .iter()
        .map(|r| {
            let [ago, at] = last(&r.usage);
            let flag = match (r.flag, &unused_text) {
                (Some(Flag::NeverUsed), _) => "never used".to_string(),
                (Some(Flag::Unused), Some(d)) => format!("not used for {d}"),
                _ => String::new(),
            };
            vec![
                r.id.clone(),
                r.name.clone().unwrap_or_default(),
                r.state.map_or("-", State::as_str).to_string(),
                ago,
                at,
                r.usage.counts.allowed.to_string(),
                r.usage.counts.denied_total().to_string(),
                denials(&r.usage),
                flag,
            ]
        })
        .collect();
    let mut lines = if rows.is_empty() {
        vec![format!(
            "no keys in {}; add one with keygate create",
            cli.store.display()
        )]
    } else {
        table(
            &[
                "ID",
                "NAME",
                "STATUS",
                "LAST USED",
                "AT",
                "ALLOWED",
                "DENIED",
                "DENIALS",
                "FLAG",
            ],
            &rows,
        )
    };
    let others = |title: &str, rows: &[usage::Row], lines: &mut Vec<String>| {
        if rows.is_empty() {
            return;
        }
        lines.push(String::new());
        lines.push(title.to_string());
        let cells: Vec<Vec<String>> = rows
            .iter()
            .map(|r| {
                let [ago, at] = last(&r.usage);
                vec![
                    r.id.clone(),
                    ago,
                    at,
                    r.usage.counts.allowed.to_string(),
                    r.usage.counts.denied_total().to_string(),
                    denials(&r.usage),
                ]
            })
            .collect();
        lines.extend(table(
            &["ID", "LAST USED", "AT", "ALLOWED", "DENIED", "DENIALS"],
            &cells,
        ));
    };
    others(
        "in Envoy's counters, not in the store (removed keys):",
        &report.removed,
        &mut lines,
    );
    others(
        "members of the policy's key sets:",
        &report.key_sets,
        &mut lines,
    );
    lines.push(String::new());
    let used = report.keys.iter().filter(|r| r.usage.used()).count();
    let mut summary = format!(
        "{} key{}: {used} used, {} never used",
        report.keys.len(),
        if report.keys.len() == 1 { "" } else { "s" },
        never.len()
    );
    if let Some(d) = &unused_text {
        summary += &format!(", {} not used for {d}", unused.len());
    }
    lines.push(summary);
    let since = merged.uptime.map(|up| {
        if answered.len() == 1 {
            format!(" since Envoy started {} ago", usage::span(up))
        } else {
            format!(
                " since the Envoys started (the last {} ago)",
                usage::span(up)
            )
        }
    });
    if !never.is_empty() {
        lines.push(format!(
            "never used{}: {}",
            since.as_deref().unwrap_or_default(),
            never.join(", ")
        ));
    }
    if let (Some(d), false) = (&unused_text, unused.is_empty()) {
        lines.push(format!("not used for {d}: {}", unused.join(", ")));
    }
    if let Some(n @ 1..) = merged.dropped {
        lines.push(format!(
            "{n} request{} of keys beyond the policy's per_key_metrics_max counted for no key: \
             a key shown as never used may have been used",
            if n == 1 { " was" } else { "s were" }
        ));
    }
    if let Some(t) = &merged.totals {
        lines.push(format!(
            "every request, with a key or not: {} allowed, {} denied{}",
            t.allowed,
            t.denied_total(),
            if t.denied.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    t.denied
                        .iter()
                        .map(|(reason, n)| format!("{reason}={n}"))
                        .collect::<Vec<_>>()
                        .join(",")
                )
            }
        ));
    }
    let up = |uptime: Option<i64>| {
        uptime.map_or_else(String::new, |u| format!(" (up {})", usage::span(u)))
    };
    lines.push(match answered.as_slice() {
        [(url, uptime)] => format!("counters of Envoy {url}{}", up(*uptime)),
        many => format!(
            "counters of {} Envoys, summed; last use the latest: {}",
            many.len(),
            many.iter()
                .map(|(url, uptime)| format!("{url}{}", up(*uptime)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
    if !failed.is_empty() {
        lines.push(format!(
            "not answering: {}",
            failed
                .iter()
                .map(|(url, why)| format!("{url} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    emit(&lines.join("\n"))?;
    Ok(ExitCode::SUCCESS)
}

fn verify(
    cli: &Cli,
    request: Option<(&str, &str)>,
    client_ip: Option<std::net::IpAddr>,
    now: i64,
) -> Result<ExitCode, Error> {
    let key = read_key()?;
    let s = store::load(&cli.store)?;
    let rendered = s.render()?;
    let config = &rendered.config;
    let prefix = keys::log_prefix(&key);
    let (mut out, mut text, accepted) = match decision::identify(config, &key, now) {
        Ok(found) => {
            let k = found.key;
            let plan = k.limit.as_ref().map(|l| l.plan.as_str());
            let expires = k.expires_at.map(time::format_rfc3339);
            let out = json!({
                "accepted": true, "prefix": prefix, "id": found.id, "role": k.role,
                "client": k.client, "tenant": k.tenant, "scopes": k.scopes, "plan": plan,
                "expires_at": expires,
            });
            let text = format!(
                "accepted: {prefix}... is key {} (role {}, client {}, tenant {}, scopes {}, plan {}, expires {})",
                found.id,
                k.role,
                k.client.as_deref().unwrap_or("-"),
                k.tenant.as_deref().unwrap_or("-"),
                if k.scopes.is_empty() { "-".into() } else { k.scopes.join(",") },
                plan.unwrap_or("none"),
                expires.as_deref().unwrap_or("never"),
            );
            (out, text, true)
        }
        Err(reason) => {
            // Name the key when it is a known one (revoked, expired, suspended).
            let id = config.find_key(&keys::digest(&key)).map(|k| k.id);
            let cause = store::simulate::cause(config, &key, reason);
            let stored = id.as_deref().and_then(|id| s.find(id).ok());
            let when = match cause {
                store::simulate::Cause::Revoked => stored
                    .and_then(|k| k.revoked_at.as_deref())
                    .map(|t| format!(" at {t}")),
                store::simulate::Cause::Expired => stored
                    .and_then(|k| k.expires_at.as_deref())
                    .map(|t| format!(" at {t}")),
                _ => None,
            }
            .unwrap_or_default();
            let out = json!({
                "accepted": false, "prefix": prefix, "error": reason.code(),
                "message": reason.message(), "id": id, "cause": cause.as_str(),
            });
            let who = id.map_or_else(String::new, |id| format!(" (key {id})"));
            let text = format!(
                "refused: {} ({}): {prefix}...{who}: {}{when}",
                reason.code(),
                reason.message(),
                cause.text(config)
            );
            (out, text, false)
        }
    };
    let Some((method, req_path)) = request else {
        print(cli, &out, &text)?;
        return Ok(ExitCode::from(if accepted { 0 } else { 1 }));
    };
    let answer = store::simulate::answer(config, &key, method, req_path, client_ip, now);
    let headers: serde_json::Map<String, Value> = answer
        .headers
        .iter()
        .map(|(n, v)| (n.clone(), json!(v)))
        .collect();
    if let Some(fields) = out.as_object_mut() {
        fields.insert(
            "request".into(),
            json!({
                "method": method, "path": req_path, "client_ip": client_ip,
                "status": answer.status,
                "error": answer.refusal.map(|r| r.0),
                "message": answer.refusal.map(|r| r.1),
                "requirement": answer.requirement,
                "detail": answer.detail,
                "headers": headers,
            }),
        );
    }
    let shown_method = decision::log_method(method.as_bytes());
    let shown_path = decision::log_path(req_path.as_bytes());
    text += &format!("\n{shown_method} {shown_path}: {}", answer.status);
    match answer.refusal {
        None => {
            text += " (forwarded upstream) with";
            for (name, value) in &answer.headers {
                text += &format!("\n  {name}: {value}");
            }
        }
        Some((code, message)) => {
            text += &format!(" {code} ({message})");
            match (answer.requirement, answer.detail) {
                (Some(r), Some(d)) => text += &format!(": {r}: {d}"),
                (Some(r), None) => text += &format!(": {r}"),
                (None, Some(d)) => text += &format!(": {d}"),
                (None, None) => {}
            }
        }
    }
    print(cli, &out, &text)?;
    Ok(ExitCode::from(if answer.status == 200 { 0 } else { 1 }))
}

fn read_stdin() -> Result<Vec<u8>, Error> {
    let mut input = Vec::new();
    std::io::stdin()
        .read_to_end(&mut input)
        .map_err(|e| Error::Other(format!("cannot read standard input: {e}")))?;
    Ok(input)
}

/// A key from stdin, without the trailing newline that `echo` or a file adds.
fn read_key() -> Result<Vec<u8>, Error> {
    let mut key = read_stdin()?;
    if key.last() == Some(&b'\n') {
        key.pop();
        if key.last() == Some(&b'\r') {
            key.pop();
        }
    }
    Ok(key)
}
