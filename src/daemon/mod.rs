//! `custos daemon`: runs every tenant's jobs from the cron schedules of its
//! policy, unattended, under systemd (see `docs/daemon.md`).
//!
//! - [`registry`]: which jobs exist, when each is due, how each runs (the
//!   place to plug in a new job kind);
//! - [`plan`]: slots, catch-up, jitter, the rotating check subset (pure);
//! - [`scheduler`]: the loop: timers, per-tenant serialisation, the global
//!   job limit, signals, shutdown;
//! - [`slots`]: per-slot marks in the store, so daemons sharing a store run
//!   each slot once;
//! - [`state`]: `<state>/daemon/schedule.json`, what survives a restart;
//! - [`policies`]: loading and per-tenant refusal of bad policies;
//! - [`reporting`]: the scheduled compliance report (`[report] schedule`);
//! - [`metrics`], [`http`]: the Prometheus endpoint and `/healthz`;
//! - [`notify`]: sd_notify readiness, status, watchdog.

pub mod clock;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod plan;
pub mod policies;
mod queue;
pub mod registry;
pub mod reporting;
pub mod scheduler;
pub mod slots;
pub mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::store::probe::{ConditionalWrites, probe_conditional_writes};

pub use scheduler::{RunRecord, Summary};

/// How `custos daemon` was asked to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run what is due now, wait, and return (`--once`).
    pub once: bool,
    /// Accept a store that fails the conditional-write probe (`--single-node`).
    pub single_node: bool,
    /// Overrides `daemon.metrics_listen`.
    pub metrics_listen: Option<SocketAddr>,
}

/// The scheduler's tick: how often its loop goes round when nothing is due
/// (health stamp, watchdog ping, status). Shorter when systemd's watchdog
/// wants keep-alives more often.
const TICK: Duration = Duration::from_secs(5);

/// Shared mode needs a store whose conditional writes work (leases, slot
/// marks); `--single-node` accepts one that fails the probe, with a warning.
fn store_mode(probe: &ConditionalWrites, single_node: bool, url: &str) -> Result<&'static str> {
    if probe.supported() {
        return Ok("shared");
    }
    let detail = probe
        .detail
        .as_deref()
        .unwrap_or("the conditional-write probe failed");
    if single_node {
        tracing::warn!(
            event = "daemon.single_node",
            store = %url,
            detail,
            "the store fails the conditional-write probe; running with --single-node: \
             leases cannot keep a second daemon on this store from running the same tenant's jobs"
        );
        return Ok("single_node");
    }
    Err(Error::ConditionalWritesUnsupported {
        url: url.to_owned(),
        message: format!(
            "{detail}. Leases would not keep two daemons from running one tenant's jobs at once; \
             use a store that honours conditional writes, or run exactly one daemon on this \
             store with --single-node"
        ),
    })
}

/// Runs the daemon until SIGTERM/SIGINT (or, with `--once`, until what was
/// due has run). Fails before starting anything when the store, the state
/// directory, the policies directory or the metrics address is unusable.
pub async fn run(config: Config, opts: Options) -> Result<Summary> {
    let clock = Instant::now();
    // Registered first, so a signal during start-up is not lost.
    let mut signals = scheduler::Signals::register()
        .map_err(|e| Error::Internal(format!("cannot install signal handlers: {e}")))?;
    let mut ctx = Context::from_config(&config).await?;
    ctx.actor = crate::context::default_actor("daemon");
    ctx.install_key_gate();
    let state = state::DaemonState::open(&config.state_dir)?;

    let probe = probe_conditional_writes(&ctx.store).await?;
    let mode = store_mode(&probe, opts.single_node, &ctx.store_url)?;

    let loaded = policies::load(
        &config.policies_dir,
        &policies::Policies::new(),
        &config.residency_rules(),
    );
    if loaded.refused_whole {
        let problems: Vec<String> = loaded.rejected.iter().map(|e| e.to_string()).collect();
        return Err(Error::Policy(format!(
            "cannot load the policies in {}:\n{}",
            config.policies_dir.display(),
            problems.join("\n")
        )));
    }
    let notifier = notify::Notifier::from_env();
    let tick = match notifier.watchdog() {
        Some(w) => TICK.min(w / 3).max(Duration::from_millis(100)),
        None => TICK,
    };
    let metrics = Arc::new(metrics::Metrics::new(tick, ctx.holder.clone(), mode));
    if let Some(audit) = &ctx.audit {
        metrics.watch_audit(audit.health());
    }
    metrics.policy_rejected(loaded.rejected.len());
    metrics.tick();

    let listen = opts.metrics_listen.or(config.daemon.metrics_listen);
    let (stop_http, stop_rx) = tokio::sync::watch::channel(false);
    let mut server = None;
    let mut metrics_addr = None;
    if let (Some(addr), false) = (listen, opts.once) {
        let listener = http::bind(addr).await.map_err(|e| {
            Error::InvalidArgument(format!("cannot listen for metrics on {addr}: {e}"))
        })?;
        let bound = listener.local_addr().unwrap_or(addr);
        metrics_addr = Some(bound);
        tracing::info!(event = "metrics.listening", addr = %bound, "metrics on http://{bound}/metrics, health on /healthz");
        server = Some(tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            stop_rx,
        )));
    }

    let tenants = loaded.policies.len();
    let sched = scheduler::Scheduler::new(
        ctx.clone(),
        config.clone(),
        opts.once,
        loaded.policies,
        state,
        metrics.clone(),
        notifier,
        tick,
        loaded.rejected.len(),
    );
    let unsupported = sched.unsupported_kinds();
    tracing::info!(
        event = "daemon.started",
        version = env!("CARGO_PKG_VERSION"),
        holder = %ctx.holder,
        store = %ctx.store_url,
        mode,
        once = opts.once,
        tenants,
        jobs = sched.scheduled(),
        policies_rejected = loaded.rejected.len(),
        unsupported = %unsupported.join(","),
        max_concurrent_jobs = config.daemon.max_concurrent_jobs,
        jitter_s = config.daemon.jitter.as_secs_f64(),
        tick_ms = tick.as_millis() as u64,
        metrics = metrics_addr.map(|a| a.to_string()).as_deref(),
        load_ms = clock.elapsed().as_millis() as u64,
        "custos daemon started: {tenants} tenants, {} scheduled jobs ({mode})",
        sched.scheduled()
    );
    let summary = sched.run(&mut signals).await;
    let _ = stop_http.send(true);
    if let Some(server) = server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failing_the_probe_needs_single_node() {
        let ok = ConditionalWrites {
            create_exclusive: true,
            update_checked: true,
            detail: None,
            conclusive: true,
        };
        assert_eq!(store_mode(&ok, false, "s3://b").unwrap(), "shared");
        let garage = ConditionalWrites {
            create_exclusive: false,
            update_checked: false,
            detail: Some(
                "a second create-if-absent of the same object succeeded (If-None-Match ignored)"
                    .into(),
            ),
            conclusive: true,
        };
        let err = store_mode(&garage, false, "s3://b").unwrap_err();
        assert_eq!(err.kind(), "conditional_writes_unsupported");
        assert!(err.to_string().contains("If-None-Match ignored"), "{err}");
        assert!(err.to_string().contains("--single-node"), "{err}");
        assert_eq!(store_mode(&garage, true, "s3://b").unwrap(), "single_node");
    }
}
