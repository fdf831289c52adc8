//! keygate-ratelimit: Envoy's rate-limit service (`envoy.service.ratelimit.v3`), counting
//! in Redis so a fleet of Envoys shares one limit per key. See
//! `keygate::ratelimit_service`.
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use keygate::ratelimit_service::{self, server, Options};

/// Envoy rate-limit service (domain "keygate", descriptor entries "plan" and "key_id"),
/// with the plans of a keygate key store as limits and every count in Redis.
#[derive(Parser)]
#[command(name = "keygate-ratelimit", version)]
struct Cli {
    /// Key store whose plans are the limits; reloaded when the file changes.
    #[arg(long, env = "KEYGATE_STORE", value_name = "PATH")]
    store: PathBuf,
    /// Redis URL, e.g. redis://127.0.0.1:6379 (redis://:PASSWORD@HOST:PORT/DB).
    #[arg(long, value_name = "URL")]
    redis: String,
    /// gRPC address to listen on, e.g. 127.0.0.1:8081.
    #[arg(long, value_name = "ADDR:PORT")]
    listen: SocketAddr,
    /// How long a request waits for Redis before it is answered UNAVAILABLE.
    #[arg(long, value_name = "DURATION", default_value = "25ms", value_parser = server::parse_timeout)]
    redis_timeout: Duration,
    /// Least severe log lines written (standard error).
    #[arg(long, value_enum, default_value_t = Level::Info)]
    log_level: Level,
}

#[derive(Clone, Copy, ValueEnum)]
enum Level {
    Off,
    Error,
    Warn,
    Info,
    Debug,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    ratelimit_service::logging::init(match cli.log_level {
        Level::Off => log::LevelFilter::Off,
        Level::Error => log::LevelFilter::Error,
        Level::Warn => log::LevelFilter::Warn,
        Level::Info => log::LevelFilter::Info,
        Level::Debug => log::LevelFilter::Debug,
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keygate-ratelimit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let options = Options {
        store: cli.store,
        redis: cli.redis,
        listen: cli.listen,
        redis_timeout: cli.redis_timeout,
    };
    match runtime.block_on(ratelimit_service::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keygate-ratelimit: {e}");
            ExitCode::FAILURE
        }
    }
}
