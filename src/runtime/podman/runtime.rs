//! `--runtime podman`: each task attempt runs in its own container made from the cohort image.
//!
//! The container sees the task checkout at `/workspace` and, each at its host path, exactly
//! the spawn's binds: the task's private git dir and its attempt directory (prompt, scratch,
//! codex home) read-write, the repository's object store read-only. Never the repository's
//! git dir (config, hooks, refs, cohort's state, other tasks' files): the checkout's `.git`
//! file names the private git dir, whose alternates reach the objects. Also network, memory
//! and pids from `[container]`, labels `cohort.run` and `cohort.task`, and the agent as its
//! main process: cohort attaches to the created container, starts it, streams its output, and
//! takes the exit code from `wait` (no exec session, no kill: what `podman run` does, minus
//! its client). The API key never goes into the create spec, which podman stores and `podman
//! inspect` shows: it goes down the attached stdin, where `/bin/sh` (in every cohort image)
//! reads `KEY=VALUE` lines into its environment up to an empty line and then execs the agent,
//! whose stdin is the rest. Whatever happens the container is removed afterwards, in the
//! background (off the task's critical path) but always before the run ends (`cleanup_run`
//! waits for it).
//!
//! Paths: invocation arguments, environment values and the working directory that point into
//! the checkout are rewritten to `/workspace` (the image's WORKDIR, what an agent and a human
//! in `cohort container enter` expect). An absolute program path that is not under a mount
//! (e.g. the host's codex) becomes its file name, found on the image's PATH, where `cohort
//! image build` put it.
//!
//! User namespaces: rootless engines use `keep-id` mapped onto the image user (files written
//! belong to the invoking user). Rootful engines use `userns=auto`: each container gets its
//! own unprivileged host id range. The git dir and the checkout are then bind-mounted from
//! idmapped views of them and of the other binds (see `idmap`), made after the container is created (its id range is
//! known then) and before it starts: the checkout's owner on disk appears as the image's user,
//! which runs the agent, so it can write, git sees no "dubious ownership", and files it writes
//! belong to the checkout's owner on the host. Nothing is chowned. Where cohort cannot make
//! idmapped mounts (not root, as in the hardened system service, or an old kernel) the
//! container still gets `userns=auto`, with one pinned mapping: the image user is the
//! checkout's owner on the host, every other id (root included) an unprivileged auto range.
//! The agent then runs as the owner's host id rather than an id of its own: weaker than the
//! idmapped views, but still no host root and no shared user namespace. An engine that cannot
//! start such a container (podman 4.3: EPERM mounting the rootfs for a user namespace of more
//! than one range) gets, from then on in the run, the agent as the checkout's owner in the
//! host user namespace, with a warning.
//!
//! Caches (`Spawn::caches`, the verify gate's `[verify] caches`): a podman named volume each,
//! mounted in the workspace or the image user's `HOME`, kept between containers and runs; see
//! `caches` for how each mode's user gets to write them. Containers other than an agent's say
//! their role in their name (`cohort-<run>-<task>-verify-<rand>`) and all in `cohort.role`.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::idmap::{self, IdMap, IdmappedMount};
use super::{BindMount, ContainerSpec, NetworkMode, Podman, UsernsMode};
use crate::runtime::{Exit, Output, Role, Runtime, Spawn};

/// The image tag used when `[image] tag` is not set.
pub const DEFAULT_IMAGE: &str = "localhost/cohort:latest";
/// Where the checkout appears inside a container.
pub const WORKSPACE: &str = "/workspace";
pub const LABEL_RUN: &str = "cohort.run";
pub const LABEL_TASK: &str = "cohort.task";
/// What the container runs: `agent` or `verify` ([`crate::runtime::Role`]).
pub const LABEL_ROLE: &str = "cohort.role";
/// Where a rootful run puts the idmapped views of a task's git dir and checkout, one directory
/// per container (named after it).
pub const IDMAP_DIR: &str = "/run/cohort/idmap";
/// Where a task container finds the model gateway's socket.
pub const GATEWAY_SOCKET: &str = "/run/cohort/gateway.sock";

/// Settings for task containers (from `[image]` and `[container]`).
#[derive(Debug, Clone)]
pub struct PodmanSettings {
    pub image: String,
    pub network: NetworkMode,
    pub memory_bytes: Option<i64>,
    pub pids_limit: Option<i64>,
    /// Extra bind mounts (`[container] mounts`).
    pub mounts: Vec<BindMount>,
}

pub struct PodmanRuntime {
    podman: Podman,
    settings: PodmanSettings,
    /// The image's numeric user, for rootless keep-id.
    image_user: Option<(u32, u32)>,
    /// The image's `HOME` (its config's environment), where home caches go.
    image_home: Option<String>,
    /// Rootful with idmapped mounts available: the staging root ([`IDMAP_DIR`]).
    idmap_root: Option<PathBuf>,
    /// Rootful without idmapped views: whether the engine can start `userns=auto` with a
    /// pinned mapping (cleared after the first failed start).
    pinned_ok: AtomicBool,
    /// Held around each create. Rootless podman 5 reads /etc/subuid through libsubid for
    /// every keep-id create, and libsubid is not thread-safe: three creates at once crashed
    /// the service (SIGSEGV in idtools._Cfunc_subid_get_uid_ranges, podman 5.4, Debian 13).
    /// A create takes ~50-130 ms; start, exec and wait stay parallel.
    creates: tokio::sync::Mutex<()>,
    /// Containers being removed in the background; `cleanup_run` waits for them.
    removals: std::sync::Mutex<tokio::task::JoinSet<()>>,
    /// Creates in flight now, and the most seen at once (tests prove the lock holds).
    #[cfg(test)]
    pub(crate) creating: (std::sync::atomic::AtomicUsize, std::sync::atomic::AtomicUsize),
}

/// A task container's main process: argv, environment (never a secret) and its stdin.
struct MainProcess {
    command: Vec<String>,
    env: Vec<String>,
    stdin: Option<Vec<u8>>,
}

/// A container spec plus the idmapped views it needs before it starts.
struct Prepared {
    spec: ContainerSpec,
    /// `(host source, staging path)`, mounted with the checkout owner → image user mapping.
    idmapped: Vec<(PathBuf, PathBuf)>,
    /// The staging directory of those views.
    stage: Option<PathBuf>,
    /// The checkout's owner on the host.
    owner: (u32, u32),
    /// For the main process's stdin (secrets first, see [`READ_SECRETS`]).
    stdin: Option<Vec<u8>>,
}

impl PodmanRuntime {
    /// Checks that the image exists (with a hint to build it) and reads its user.
    pub async fn new(podman: Podman, settings: PodmanSettings) -> Result<PodmanRuntime> {
        if !podman.image_exists(&settings.image).await? {
            anyhow::bail!(
                "image {} is not in podman's storage ({}); build it with `cohort image build` (or run agents here with --runtime host)",
                settings.image,
                podman.describe()
            );
        }
        let raw: serde_json::Value = podman.image_inspect_raw(&settings.image).await?;
        let image_user = parse_image_user(raw["Config"]["User"].as_str().unwrap_or(""));
        let image_home = image_env(&raw["Config"]["Env"], "HOME").filter(|h| h.starts_with('/'));
        let idmap_root = if podman.rootless() {
            None
        } else {
            let root = PathBuf::from(IDMAP_DIR);
            let probe = root.clone();
            match tokio::task::spawn_blocking(move || idmap::supported(&probe)).await? {
                Ok(()) => Some(root),
                Err(e) => {
                    tracing::info!(
                        "rootful podman: cannot make idmapped mounts under {IDMAP_DIR} ({e}); task containers \
                         get userns=auto with the image user mapped onto the checkout's owner"
                    );
                    None
                }
            }
        };
        Ok(PodmanRuntime {
            podman,
            settings,
            image_user,
            image_home,
            idmap_root,
            pinned_ok: AtomicBool::new(true),
            creates: tokio::sync::Mutex::new(()),
            removals: Default::default(),
            #[cfg(test)]
            creating: Default::default(),
        })
    }

    /// Whether task containers get `userns=auto` with idmapped mounts (rootful engines).
    pub fn uses_idmap(&self) -> bool {
        self.idmap_root.is_some()
    }

    /// Whether the engine has not (yet) refused a pinned `userns=auto` mapping.
    #[cfg(test)]
    pub(crate) fn pinned_ok(&self) -> bool {
        self.pinned_ok.load(Ordering::Relaxed)
    }

    /// As if cohort could not make idmapped mounts (the hardened system service's case).
    #[cfg(test)]
    pub(crate) fn without_idmap(mut self) -> Self {
        self.idmap_root = None;
        self
    }

    pub fn podman(&self) -> &Podman {
        &self.podman
    }

    /// Waits for the task containers being removed in the background, then removes every
    /// container labelled with this run (left by a crashed or killed cohort). Returns how many
    /// of the latter were removed.
    pub async fn cleanup_run(&self, run_id: &str) -> Result<usize> {
        self.removals_done().await;
        cleanup_run(&self.podman, run_id).await
    }

    /// Waits until every task container this runtime ran so far is removed.
    pub async fn removals_done(&self) {
        let mut pending = std::mem::take(&mut *self.removals.lock().unwrap_or_else(|e| e.into_inner()));
        while pending.join_next().await.is_some() {}
    }

    fn remove_later(&self, id: String, stage: Option<PathBuf>) {
        let podman = self.podman.clone();
        let mut set = self.removals.lock().unwrap_or_else(|e| e.into_inner());
        // Reap the finished ones, so a long run does not keep them all.
        while set.try_join_next().is_some() {}
        set.spawn(async move {
            if let Err(e) = podman.remove_container(&id, true).await {
                if !e.is_not_found() {
                    tracing::warn!("cannot remove container {id}: {e}");
                }
            }
            if let Some(stage) = &stage {
                remove_stage(stage);
            }
        });
    }

    fn container_spec(&self, spawn: &Spawn, labels: BTreeMap<String, String>) -> Result<Prepared> {
        let checkout = &spawn.workdir;
        let name = container_name(spawn);
        let meta = std::fs::metadata(checkout).with_context(|| format!("cannot read {}", checkout.display()))?;
        let owner = (meta.uid(), meta.gid());
        // Before anything is staged: a cache path that cannot be mounted fails the spawn here.
        let volumes = self.cache_volumes(spawn, owner)?;
        // With idmapped views, every source is a view under the staging directory instead.
        let stage = self.idmap_root.as_ref().map(|root| root.join(&name));
        let mut idmapped = Vec::new();
        let mut source = |host: &Path, label: &str| -> Result<String> {
            let Some(stage) = &stage else {
                return Ok(host.display().to_string());
            };
            // podman checks at create time that bind sources exist; the views come later.
            let view = stage.join(label);
            std::fs::create_dir_all(&view).with_context(|| format!("cannot create {}", view.display()))?;
            idmapped.push((host.to_path_buf(), view.clone()));
            Ok(view.display().to_string())
        };
        let work_src = source(checkout, "workspace")?;
        let mut mounts = Vec::new();
        for (i, bind) in spawn.binds.iter().enumerate() {
            let src = source(&bind.path, &format!("bind{i}"))?;
            mounts.push(BindMount {
                read_only: !bind.writable,
                ..BindMount::new(src, bind.path.display().to_string())
            });
        }
        if let Some(sock) = self.bridged(spawn) {
            // The socket file alone; a connect needs no idmapping (it is mode 0666).
            mounts.push(BindMount::new(sock.display().to_string(), GATEWAY_SOCKET));
        }
        mounts.extend(self.settings.mounts.iter().cloned());
        let (userns, user) = if self.podman.rootless() {
            (None, None)
        } else {
            let user = self.image_user.unwrap_or((0, 0));
            let mode = match self.idmap_root {
                Some(_) => UsernsMode::Auto,
                None if self.pinned_ok.load(Ordering::Relaxed) => UsernsMode::AutoPinned { user, owner },
                None => UsernsMode::Host,
            };
            // In the host user namespace the agent runs as the owner itself.
            let runs_as = if mode == UsernsMode::Host { owner } else { user };
            (Some(mode), Some(format!("{}:{}", runs_as.0, runs_as.1)))
        };
        let MainProcess { command, env, stdin } = self.main_process(spawn)?;
        let spec = ContainerSpec {
            name: Some(name),
            command: Some(command),
            env,
            stdin: stdin.is_some(),
            no_log: true,
            image: self.settings.image.clone(),
            workspace: Some(work_src),
            mounts,
            volumes,
            userns,
            image_user: self.image_user,
            network: self.settings.network,
            memory_bytes: self.settings.memory_bytes,
            pids_limit: self.settings.pids_limit,
            labels,
            workdir: Some(WORKSPACE.into()),
            user,
            ..Default::default()
        };
        Ok(Prepared {
            spec,
            idmapped,
            stage,
            owner,
            stdin,
        })
    }

    /// The idmapped views for a created container: the checkout's owner on disk becomes the
    /// host id that the container's `userns=auto` range gives the image user.
    async fn idmap_views(&self, id: &str, prepared: &Prepared) -> Result<Vec<IdmappedMount>> {
        if prepared.idmapped.is_empty() {
            return Ok(Vec::new());
        }
        let raw = self.podman.inspect_container_raw(id).await?;
        let maps = &raw["HostConfig"]["IDMappings"];
        let (uid, gid) = self.image_user.unwrap_or((0, 0));
        let host = |key: &str, id: u32| {
            host_id(
                maps[key].as_array().into_iter().flatten().filter_map(|v| v.as_str()),
                id,
            )
            .with_context(|| format!("id {id} is not in the container's {key} {}", maps[key]))
        };
        let map = IdMap {
            uid: (prepared.owner.0, host("UidMap", uid)?),
            gid: (prepared.owner.1, host("GidMap", gid)?),
        };
        let pairs = prepared.idmapped.clone();
        tokio::task::spawn_blocking(move || IdmappedMount::create_all(&pairs, map))
            .await?
            .context("cannot make the idmapped view of the checkout")
    }

    /// The main process (argv, environment without secrets) and what goes down its stdin.
    fn main_process(&self, spawn: &Spawn) -> Result<MainProcess> {
        let inv = &spawn.invocation;
        let tr = |s: &str| translate(s, &spawn.workdir);
        let program = if Path::new(&inv.program).is_absolute() && !self.mounted(Path::new(&inv.program), spawn) {
            Path::new(&inv.program)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| inv.program.clone())
        } else {
            tr(&inv.program)
        };
        let mut cmd = Vec::new();
        if self.bridged(spawn).is_some() {
            // The bridge listens first, then runs the agent and ends with it.
            let listen = std::net::SocketAddr::from(crate::runtime::BRIDGE_ADDR).to_string();
            cmd.extend(
                [
                    "cohort",
                    "__bridge",
                    "--listen",
                    &listen,
                    "--socket",
                    GATEWAY_SOCKET,
                    "--",
                ]
                .map(String::from),
            );
        }
        cmd.push(program);
        cmd.extend(inv.args.iter().map(|a| tr(a)));
        let env = inv.env.iter().map(|(k, v)| format!("{k}={}", tr(v))).collect();
        if inv.secret_env.is_empty() {
            return Ok(MainProcess {
                command: cmd,
                env,
                stdin: inv.stdin.clone(),
            });
        }
        let mut stdin = Vec::new();
        for (k, v) in &inv.secret_env {
            let valid = !k.is_empty() && k.bytes().all(|b| b == b'_' || b.is_ascii_alphanumeric());
            anyhow::ensure!(valid, "secret variable name {k:?} is not a plain environment name");
            anyhow::ensure!(
                !v.expose().contains('\n'),
                "the secret in {k} spans lines; it cannot be passed on"
            );
            stdin.extend_from_slice(format!("{k}={}\n", v.expose()).as_bytes());
        }
        stdin.push(b'\n');
        stdin.extend_from_slice(inv.stdin.as_deref().unwrap_or_default());
        let mut wrapped: Vec<String> = ["/bin/sh", "-c", READ_SECRETS, "sh"].map(String::from).into();
        wrapped.extend(cmd);
        Ok(MainProcess {
            command: wrapped,
            env,
            stdin: Some(stdin),
        })
    }

    /// The gateway socket to bridge into the container: not with `network = "host"`, where
    /// the agent reaches the host's loopback itself.
    fn bridged<'s>(&self, spawn: &'s Spawn) -> Option<&'s Path> {
        (self.settings.network != NetworkMode::Host)
            .then_some(spawn.gateway_socket.as_deref())
            .flatten()
    }

    fn mounted(&self, p: &Path, spawn: &Spawn) -> bool {
        p.starts_with(&spawn.workdir)
            || spawn.binds.iter().any(|b| p.starts_with(&b.path))
            || self.settings.mounts.iter().any(|m| p.starts_with(&m.source))
    }
}

/// Removes every container labelled `cohort.run=<run_id>`, and the idmapped views a killed
/// cohort left for them.
pub async fn cleanup_run(podman: &Podman, run_id: &str) -> Result<usize> {
    let list = podman.list_containers(&[(LABEL_RUN, run_id)]).await?;
    for c in &list {
        podman
            .remove_container(&c.id, true)
            .await
            .or_else(|e| if e.is_not_found() { Ok(()) } else { Err(e) })?;
    }
    let prefix = sanitize_name(&format!("cohort-{run_id}-"));
    for entry in std::fs::read_dir(IDMAP_DIR).into_iter().flatten().flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            remove_stage(&entry.path());
        }
    }
    Ok(list.len())
}

/// Unmount a container's idmapped views and remove its staging directory. Only ever
/// `rmdir`: a recursive delete could reach through a view that is still mounted into the
/// user's checkout.
fn remove_stage(stage: &Path) {
    for entry in std::fs::read_dir(stage).into_iter().flatten().flatten() {
        idmap::unmount(&entry.path());
    }
    let _ = std::fs::remove_dir(stage);
}

/// The host id of container id `id`, from podman's `container:host:size` ranges.
fn host_id<'a>(ranges: impl Iterator<Item = &'a str>, id: u32) -> Option<u32> {
    ranges.into_iter().find_map(|r| {
        let mut it = r.split(':').map(|n| n.parse::<u64>().ok());
        let (c, h, n) = (it.next()??, it.next()??, it.next()??);
        let id = id as u64;
        (c <= id && id < c + n).then(|| u32::try_from(h + id - c).ok())?
    })
}

/// The value of `key` in an image config's `Env` (`["KEY=VALUE", ...]`).
fn image_env(env: &serde_json::Value, key: &str) -> Option<String> {
    env.as_array()?.iter().filter_map(|v| v.as_str()).find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

/// `cohort-<run>-<task>-<rand>` for an agent (the name it always had), with the role before
/// the random part for anything else (`cohort-<run>-<task>-verify-<rand>`).
fn container_name(spawn: &Spawn) -> String {
    let role = match spawn.role {
        Role::Agent => String::new(),
        role => format!("{}-", role.as_str()),
    };
    sanitize_name(&format!(
        "cohort-{}-{:03}-{role}{:08x}",
        spawn.run_id,
        spawn.task,
        rand::random::<u32>()
    ))
}

/// `user`, `uid`, `uid:gid` of an image config; numeric forms only.
pub(crate) fn parse_image_user(user: &str) -> Option<(u32, u32)> {
    let mut it = user.splitn(2, ':');
    let uid = it.next()?.parse().ok()?;
    let gid = it.next().and_then(|g| g.parse().ok()).unwrap_or(uid);
    Some((uid, gid))
}

/// A container name podman accepts: `[a-zA-Z0-9][a-zA-Z0-9_.-]*`.
fn sanitize_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_.-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Rewrites a path (or `--flag=path`-free value) under `checkout` to `/workspace`.
fn translate(s: &str, checkout: &Path) -> String {
    let root = checkout.display().to_string();
    let root = root.trim_end_matches('/');
    if s == root {
        return WORKSPACE.into();
    }
    match s.strip_prefix(root) {
        Some(rest) if rest.starts_with('/') => format!("{WORKSPACE}{rest}"),
        _ => s.to_owned(),
    }
}

/// The labels of a task's container: `cohort=task`, its run, its task number and its role.
pub fn task_labels(spawn: &Spawn) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("cohort".to_string(), "task".to_string()),
        (LABEL_RUN.to_string(), spawn.run_id.clone()),
        (LABEL_TASK.to_string(), format!("{:03}", spawn.task)),
        (LABEL_ROLE.to_string(), spawn.role.as_str().to_string()),
    ])
}

#[async_trait::async_trait]
impl Runtime for PodmanRuntime {
    fn name(&self) -> &'static str {
        "podman"
    }

    fn gateway_addr(&self, gateway: std::net::SocketAddr) -> std::net::SocketAddr {
        match self.settings.network {
            NetworkMode::Host => gateway,
            _ => std::net::SocketAddr::from(crate::runtime::BRIDGE_ADDR),
        }
    }

    async fn cleanup_run(&self, run_id: &str) -> Result<()> {
        let removed = PodmanRuntime::cleanup_run(self, run_id).await?;
        if removed > 0 {
            tracing::info!(run = run_id, removed, "removed leftover task containers");
        }
        Ok(())
    }

    async fn run(&self, spawn: Spawn, output: UnboundedSender<Output>, cancel: CancellationToken) -> Result<Exit> {
        let labels = task_labels(&spawn);
        let prepared = self.container_spec(&spawn, labels.clone())?;
        if let Err(e) = self.ensure_caches(&spawn).await {
            if let Some(stage) = &prepared.stage {
                remove_stage(stage);
            }
            return Err(e);
        }
        let pinned = matches!(prepared.spec.userns, Some(UsernsMode::AutoPinned { .. }));
        match self.attempt(&spawn, prepared, output.clone(), &cancel).await {
            // Some engines cannot mount a rootfs for a user namespace of more than one range
            // (podman 4.3, idmapped lower layers: EPERM). Learn it once per run; any other
            // failure to start is an error, not a reason to share the host's user namespace.
            Err(Failed::Start(e)) if pinned && format!("{e:#}").contains("mounting storage") => {
                if self.pinned_ok.swap(false, Ordering::Relaxed) {
                    tracing::warn!(
                        "rootful podman cannot start a userns=auto container with a pinned id mapping \
                         ({e:#}); task containers run as the checkout's owner in the host user namespace"
                    );
                }
                let prepared = self.container_spec(&spawn, labels)?;
                self.attempt(&spawn, prepared, output, &cancel)
                    .await
                    .map_err(Failed::into_inner)
            }
            r => r.map_err(Failed::into_inner),
        }
    }
}

#[path = "attempt.rs"]
mod attempt;
use attempt::{Failed, READ_SECRETS};

#[path = "caches.rs"]
mod caches;

#[cfg(test)]
#[path = "runtime_unit.rs"]
mod unit;
