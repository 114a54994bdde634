//! Where an agent runs. The host runtime starts it as a process (under a
//! guard that takes its whole process tree down with it); the podman
//! runtime (containers issue) runs it inside a container.

pub mod guard;
pub mod host;
mod host_caches;
pub mod image_store;
pub mod lines;
pub mod podman;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::agent::Invocation;

#[derive(Debug, Clone)]
pub struct Spawn {
    pub invocation: Invocation,
    /// The working directory (the task checkout).
    pub workdir: PathBuf,
    /// Besides the checkout, all the agent may reach of cohort's files, each at its host path:
    /// its private git dir and its attempt's directory (prompt, scratch), and the repository's
    /// object store read-only. A container mounts exactly these; nothing else of the
    /// repository's git dir.
    pub binds: Vec<Bind>,
    pub timeout: Option<Duration>,
    /// The run and task this is for (container names and labels).
    pub run_id: String,
    pub task: usize,
    /// The model gateway's unix socket, for a runtime whose agents cannot reach the host's
    /// loopback (a container's own network namespace): it is mounted in and bridged to the
    /// agent's loopback at [`BRIDGE_ADDR`].
    pub gateway_socket: Option<PathBuf>,
    /// What runs: the agent, or the project's verify command after it.
    pub role: Role,
    /// Directories that persist between the tasks of a run and between runs (`[verify]
    /// caches`), each held by this spawn alone for its duration (see `run::caches`).
    pub caches: Vec<Cache>,
    /// The tree the workdir holds (cohort's index of it), for a runtime that sends the
    /// checkout elsewhere (remote workers); the others run in the workdir itself.
    pub tree: Option<crate::git::Oid>,
    /// The attempt's scratch directory (prompt, agent configuration, conversation), for a
    /// runtime that must carry it to the agent and back.
    pub scratch: Option<PathBuf>,
}

/// What a spawn runs, for container names and labels (`cohort.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    #[default]
    Agent,
    Verify,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Verify => "verify",
        }
    }
}

/// One persistent cache directory for a spawn: a podman named volume in a container, a
/// directory of cohort's state on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    /// The podman volume's name (`cohort-cache-…`): stable per repository, cache path and slot.
    pub volume: String,
    /// The host runtime's copy, under the repository's cohort state.
    pub host_dir: PathBuf,
    pub at: CachePath,
}

/// Where a cache appears to the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CachePath {
    /// Relative to the checkout (e.g. `target`).
    Workdir(PathBuf),
    /// Relative to the home directory (`~/.cargo/registry`): in a container the image
    /// user's home; on the host the user's own directory, used in place.
    Home(PathBuf),
}

/// Where an agent in a container of its own network namespace finds the model gateway.
pub const BRIDGE_ADDR: ([u8; 4], u16) = ([127, 0, 0, 1], 8080);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub path: PathBuf,
    pub writable: bool,
}

/// How an agent process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    TimedOut(Duration),
    /// Stopped because cohort is shutting down (Ctrl-C, SIGTERM).
    Cancelled,
}

impl Exit {
    pub fn code(self) -> Option<i32> {
        match self {
            Exit::Code(c) => Some(c),
            Exit::Signal(s) => Some(128 + s),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub enum Output {
    Stdout(String),
    Stderr(String),
    /// Where it runs (a remote worker's name), said once it is placed.
    Placed(String),
}

#[async_trait::async_trait]
pub trait Runtime: Send + Sync {
    fn name(&self) -> &'static str;
    /// Where an agent of this runtime reaches the model gateway listening on `gateway`
    /// (host loopback). The host runtime's agents use it as it is.
    fn gateway_addr(&self, gateway: std::net::SocketAddr) -> std::net::SocketAddr {
        gateway
    }
    /// Removes what a run left behind in this runtime (e.g. the containers
    /// of a crashed process); called when a run (re)starts and ends.
    async fn cleanup_run(&self, _run_id: &str) -> Result<()> {
        Ok(())
    }
    /// Called once a run's tasks are about to start (after `cleanup_run`), with the run's
    /// directory: a runtime that serves workers opens the run to them.
    async fn start_run(&self, _run_id: &str, _dir: &std::path::Path) -> Result<()> {
        Ok(())
    }
    /// Runs the invocation to its end, sending its output line by line.
    async fn run(&self, spawn: Spawn, output: UnboundedSender<Output>, cancel: CancellationToken) -> Result<Exit>;
}
