//! The remote runtime: every spawn becomes a job for a worker. The controller keeps the
//! repository, the state, the merges and the gateway; a worker gets the spawn's tree (only
//! the difference from what its checkout holds), runs the command, and sends back what
//! changed. Those changes are written into the task's checkout here, through the same
//! no-follow code that writes any untrusted entry, and the ordinary collect phase then
//! re-hashes and checks them like the work of a local agent, before anything touches a ref.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::controller::{Controller, ControllerSettings};
use super::fleet::{Fleet, FleetHost, WorkerLaunch};
use super::protocol::{CacheSpec, Job};
use super::queue::{Finished, Work};
use super::registry::Registry;
use super::{files, lock};
use crate::git::safefs::Dir;
use crate::run::blocking;
use crate::runtime::podman::NetworkMode;
use crate::runtime::{CachePath, Exit, Output, Role, Runtime, Spawn, BRIDGE_ADDR};

/// A scratch directory larger than this is not sent (it holds a prompt, the agent's
/// configuration and its conversation: kilobytes).
const SCRATCH_CAP: u64 = 64 << 20;

pub struct RemoteRuntime {
    controller: Controller,
    /// The run being served and its directory.
    run: std::sync::Mutex<Option<(String, PathBuf)>>,
    /// The podman hosts whose workers serve each run (`--host`), if any.
    hosts: Option<Hosts>,
    fleet: tokio::sync::Mutex<Option<Fleet>>,
}

/// Podman hosts, connected, and what their workers run.
pub struct Hosts {
    pub hosts: Vec<FleetHost>,
    /// The run's image in cohort's blob store: its manifest digest and podman image id.
    pub store: cohort_oci::BlobStore,
    pub image_digest: String,
    pub image_id: String,
    pub network: NetworkMode,
    pub memory_bytes: Option<i64>,
    pub pids_limit: Option<i64>,
}

impl RemoteRuntime {
    pub async fn start(settings: ControllerSettings, hosts: Option<Hosts>) -> Result<RemoteRuntime> {
        let controller = Controller::start(settings).await?;
        if let Some(h) = &hosts {
            // Only the run's image, and only what it is made of.
            let registry = Registry::only(h.store.clone(), std::slice::from_ref(&h.image_digest))?;
            controller.set_registry(std::sync::Arc::new(registry));
        }
        Ok(RemoteRuntime {
            controller,
            run: std::sync::Mutex::new(None),
            hosts,
            fleet: tokio::sync::Mutex::new(None),
        })
    }

    /// Starts the run's workers on every host (removing what a crashed start of the same
    /// run left there first).
    async fn start_fleet(&self, run_id: &str, token: &super::token::WorkerToken) -> Result<()> {
        let Some(h) = &self.hosts else { return Ok(()) };
        let t0 = std::time::Instant::now();
        let mut set = tokio::task::JoinSet::new();
        for host in &h.hosts {
            let (podman, run_id) = (host.podman.clone(), run_id.to_string());
            set.spawn(async move { Fleet::cleanup_run(&podman, &run_id).await });
        }
        while let Some(joined) = set.join_next().await {
            joined.context("cleaning a worker host panicked")??;
        }
        let launch = WorkerLaunch {
            run_id: run_id.to_string(),
            image_digest: h.image_digest.clone(),
            image_id: h.image_id.clone(),
            controller_port: self.controller.addr().port(),
            token: token.to_secret(),
            network: h.network,
            memory_bytes: h.memory_bytes,
            pids_limit: h.pids_limit,
        };
        let fleet = Fleet::start(h.hosts.clone(), &launch).await?;
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "worker containers started");
        *self.fleet.lock().await = Some(fleet);
        Ok(())
    }

    pub fn controller(&self) -> &Controller {
        &self.controller
    }

    fn job_of(spawn: &Spawn) -> Job {
        let inv = &spawn.invocation;
        let caches = spawn
            .caches
            .iter()
            .map(|c| {
                let (base, path) = match &c.at {
                    CachePath::Workdir(p) => ("workdir", p),
                    CachePath::Home(p) => ("home", p),
                };
                CacheSpec {
                    name: c.volume.clone(),
                    base: base.into(),
                    path: path.display().to_string(),
                }
            })
            .collect();
        Job {
            lease: String::new(),
            run_id: spawn.run_id.clone(),
            task: spawn.task,
            role: spawn.role.as_str().into(),
            tree: String::new(),
            reset: false,
            changes: Vec::new(),
            scratch: Vec::new(),
            program: inv.program.clone(),
            args: inv.args.clone(),
            env: inv.env.clone(),
            secret_env: inv
                .secret_env
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_string()))
                .collect(),
            stdin: inv
                .stdin
                .as_ref()
                .map(|b| base64::engine::general_purpose::STANDARD.encode(b)),
            timeout_secs: spawn.timeout.map(|t| t.as_secs().max(1)),
            caches,
            gateway: spawn
                .gateway_socket
                .as_ref()
                .map(|_| SocketAddr::from(BRIDGE_ADDR).to_string()),
            heartbeat_secs: 2,
        }
    }
}

#[async_trait::async_trait]
impl Runtime for RemoteRuntime {
    fn name(&self) -> &'static str {
        "remote"
    }

    /// Agents reach the gateway at the worker's tunnel, which listens there; the worker puts
    /// its own address in when it listens elsewhere.
    fn gateway_addr(&self, _gateway: SocketAddr) -> SocketAddr {
        SocketAddr::from(BRIDGE_ADDR)
    }

    async fn start_run(&self, run_id: &str, dir: &Path) -> Result<()> {
        let token = self.controller.open_run(run_id, dir)?;
        *lock(&self.run) = Some((run_id.to_string(), dir.to_path_buf()));
        self.start_fleet(run_id, &token).await
    }

    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        // The fleet's workers are killed first, while they only wait for work: a kill then
        // returns at once. Told first that the run is over, they would exit on their own, and
        // each kill would wait for podman's clean-up of that container to let go of it.
        // Podman deletes them (auto-remove) after this returns.
        let t0 = std::time::Instant::now();
        if let Some(fleet) = self.fleet.lock().await.take() {
            // A host that died during the run cannot be cleaned now; its tasks went to the
            // others, so the run's outcome stands. Said, not failed.
            if let Err(e) = fleet.stop().await {
                crate::progress::say(&format!(
                    "cohort: warning: not every worker container could be stopped (a host out of reach?); \
                     `cohort run` of the same run id, or podman on that host, removes them:\n{e:#}"
                ));
            }
            tracing::debug!(ms = t0.elapsed().as_millis() as u64, "workers stopped");
        }
        // Workers started elsewhere (`--listen`) are told the run is over.
        let ended = {
            let mut run = lock(&self.run);
            match run.as_ref() {
                Some((id, _)) if id == run_id => run.take(),
                _ => None,
            }
        };
        if let Some((_, dir)) = ended {
            self.controller.close_run(Some(&dir));
            self.controller.drained().await;
        }
        tracing::debug!(ms = t0.elapsed().as_millis() as u64, "workers stopped, run closed");
        Ok(())
    }

    async fn run(&self, spawn: Spawn, output: UnboundedSender<Output>, cancel: CancellationToken) -> Result<Exit> {
        let Some(tree) = spawn.tree else {
            bail!("the remote runtime needs to know the checkout's tree, and cohort's index of it is gone");
        };
        if let Some(socket) = &spawn.gateway_socket {
            self.controller.set_gateway(socket);
        }
        let scratch = match spawn.scratch.clone() {
            Some(dir) => {
                let d = dir.clone();
                let entries = blocking(move || files::read_all(&Dir::open(&d)?, SCRATCH_CAP)).await?;
                Some((dir, entries))
            }
            None => None,
        };
        let mut job = Self::job_of(&spawn);
        if let Some((_, entries)) = &scratch {
            job.scratch = entries.clone();
        }
        let work = Work {
            job,
            tree,
            workdir: spawn.workdir.display().to_string(),
            scratch: scratch.as_ref().map(|(d, _)| d.display().to_string()),
            output: output.clone(),
            done: None,
        };
        let (id, finished) = self.controller.submit(work);
        let finished = tokio::select! {
            f = finished => f,
            _ = cancel.cancelled() => {
                self.controller.cancel(id);
                return Ok(Exit::Cancelled);
            }
        };
        let (worker, result, sent, received) = match finished {
            Err(_) => bail!("the controller stopped before the job ended"),
            Ok(Finished::Failed(why)) => bail!("{why}"),
            Ok(Finished::Done {
                worker,
                result,
                bytes_sent,
                bytes_received,
            }) => (worker, result, bytes_sent, bytes_received),
        };
        let _ = output.send(Output::Stderr(format!(
            "cohort: worker {worker} ran it: {sent} bytes sent, {received} bytes received"
        )));
        if spawn.role == Role::Agent {
            let (workdir, changes) = (spawn.workdir.clone(), result.changes);
            blocking(move || {
                files::apply(&Dir::open(&workdir)?, &changes)
                    .with_context(|| format!("cannot write what worker {worker} sent into the checkout"))
            })
            .await?;
            if let Some((dir, _)) = scratch {
                let entries = result.scratch;
                blocking(move || files::apply(&Dir::open(&dir)?, &entries)).await?;
            }
        }
        Ok(result.exit.into())
    }
}
