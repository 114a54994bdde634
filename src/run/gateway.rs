//! The run's model gateway (see `gateway`): started with the run, a token per task attempt,
//! and its events (tokens used, egress refused, budgets spent) written to the state DB and
//! the tasks' logs as they come.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::{Engine, RunDir};
use crate::config::Price;
use crate::gateway::{BudgetSpec, Gateway, GatewayConfig, GatewayEvent, TaskKey};
use crate::secret::Secret;

/// What the run's gateway is made of, resolved from flags and settings.
#[derive(Debug, Clone)]
pub struct GatewaySettings {
    /// The real endpoint (`[agent] base_url`, else OpenAI's).
    pub upstream: String,
    pub key: Secret,
    /// `[container] allow`: hosts agents may reach through the gateway.
    pub allow: Vec<String>,
    /// `[run] budget`.
    pub budget: BudgetSpec,
    /// `[agent] price`, for budgets in dollars.
    pub price: Option<Price>,
}

/// The gateway of one run, and the task writing down its events.
pub(super) struct RunGateway {
    pub gateway: Arc<Gateway>,
    drain: tokio::task::JoinHandle<()>,
}

impl RunGateway {
    pub fn start(e: &Arc<Engine>, settings: &GatewaySettings, run_id: &str, dir: &RunDir) -> Result<RunGateway> {
        let socket = socket_path(dir, run_id);
        let config = GatewayConfig {
            socket: Some(socket.clone()),
            allow: settings.allow.clone(),
            task_budget: settings.budget.task,
            run_budget: settings.budget.run,
            price: settings.price,
            ..GatewayConfig::new(settings.upstream.clone(), settings.key.clone())
        };
        let gateway = Arc::new(
            Gateway::start(config)
                .with_context(|| format!("cannot start the model gateway at {}", socket.display()))?,
        );
        let events = gateway.take_events();
        let (e, dir_logs, run) = (e.clone(), dir.0.join("logs"), run_id.to_string());
        let drain = tokio::spawn(async move {
            let Some(mut events) = events else { return };
            while let Some(ev) = events.recv().await {
                if let Err(err) = record(&e, &run, &dir_logs, &ev) {
                    tracing::warn!("cannot record a gateway event: {err:#}");
                }
            }
        });
        Ok(RunGateway { gateway, drain })
    }

    /// Stops the gateway (tokens die, tunnels close) once the last events are written.
    pub async fn stop(self) {
        let RunGateway { gateway, drain } = self;
        if let Ok(gw) = Arc::try_unwrap(gateway) {
            gw.shutdown().await;
        }
        // The event channel closes with the gateway; what was sent is written first.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), drain).await;
    }
}

/// A short path for the gateway's socket (unix socket paths hold about 108 bytes): in the
/// run's directory when that fits, else in the runtime directory. Either is where a podman
/// engine outside cohort's own mount namespace (the system service's) can find it.
fn socket_path(dir: &RunDir, run_id: &str) -> PathBuf {
    let beside = dir.0.join("gateway.sock");
    if beside.as_os_str().len() < 100 {
        return beside;
    }
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    runtime.join(format!("cohort-{}-{run_id}.sock", nix::unistd::getuid()))
}

/// One event into the state DB (kind `gateway`), and refusals and spent budgets also into
/// the task's log.
fn record(e: &Engine, run_id: &str, logs: &Path, ev: &GatewayEvent) -> Result<()> {
    let (task, data, line) = match ev {
        GatewayEvent::Usage { task, answer, .. } => (
            Some(task),
            serde_json::json!({"kind": "usage", "input": answer.input, "cached_input": answer.cached_input,
                               "output": answer.output, "requests": answer.requests}),
            None,
        ),
        GatewayEvent::Refused {
            task,
            host,
            port,
            at,
            reason,
        } => {
            let at = humantime::format_rfc3339_millis(*at).to_string();
            let why = format!("{reason:?}");
            (
                task.as_ref(),
                serde_json::json!({"kind": "refused", "host": host, "port": port, "at": at, "reason": why}),
                Some(format!("--- egress refused: {host}:{port} at {at} ({why})")),
            )
        }
        GatewayEvent::OverBudget {
            task,
            scope,
            budget,
            spent,
        } => (
            Some(task),
            serde_json::json!({"kind": "over_budget", "scope": scope.to_string(),
                               "budget": budget.to_string(), "spent": spent.to_string()}),
            Some(format!(
                "--- over the {scope} budget of {budget} (spent {spent}); the model refuses further requests"
            )),
        ),
    };
    let Some(TaskKey { index, attempt, .. }) = task else {
        tracing::info!(event = %data, "gateway event without a task");
        return Ok(());
    };
    e.state()?
        .event(run_id, *index, *attempt, "gateway", &data.to_string())?;
    if let Some(line) = line {
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(logs.join(format!("{index:03}.log")))?;
        writeln!(log, "{line}")?;
    }
    Ok(())
}
