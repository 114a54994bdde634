//! `cohort worker`: asks the controller for a job, makes its checkout hold the job's tree,
//! runs the command there (as the host runtime runs an agent: under a guard, its whole
//! process tree killed with it), streams its output, and sends back what changed. One job
//! at a time; the checkout is kept for the next, which is sent only the difference.
//!
//! The worker holds the token; the command it runs does not. The token is hidden from the
//! command's environment, and the worker makes itself non-dumpable, so a command running as
//! the same user cannot read the token from `/proc/<worker>/environ` or attach to it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use hyper::StatusCode;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use super::client::Client;
use super::files;
use super::protocol::{Job, JobResult, LeaseRequest, Line, OutputBatch, WireExit};
use super::slot::Slot;
use super::token::WorkerToken;
use super::RemoteError;
use crate::agent::Invocation;
use crate::git::safefs::Dir;
use crate::runtime::host::HostRuntime;
use crate::runtime::{Cache, CachePath, Output, Role, Runtime, Spawn};
use crate::secret::Secret;

pub struct WorkerSettings {
    /// `https://HOST:PORT`.
    pub controller: String,
    pub token: WorkerToken,
    pub name: String,
    /// Where the checkout, the scratch directory and the caches live.
    pub dir: PathBuf,
    /// Where agents find the model gateway (the tunnel's listener).
    pub tunnel: SocketAddr,
    /// How long the controller may be unreachable before the worker gives up.
    pub give_up: Duration,
}

/// How a worker ended without an error.
#[derive(Debug, PartialEq, Eq)]
pub enum WorkerEnd {
    /// The controller said the run is over.
    RunOver,
    Cancelled,
}

pub async fn run(settings: WorkerSettings, cancel: CancellationToken) -> Result<WorkerEnd> {
    // SAFETY: prctl with these arguments only changes this process's dumpable flag.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let client = Arc::new(Client::new(&settings.controller, settings.token.clone())?);
    let tunnel = TcpListener::bind(settings.tunnel)
        .await
        .with_context(|| format!("cannot listen for the model tunnel on {}", settings.tunnel))?;
    let tunnel_addr = tunnel.local_addr()?;
    tokio::spawn(serve_tunnel(tunnel, client.clone()));
    let mut slot = Slot::new(&settings.dir.join("checkout"))?;
    let scratch = settings.dir.join("scratch");
    std::fs::create_dir_all(&scratch)?;
    let host = HostRuntime::new(vec![settings.token.to_secret()])?;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        if cancel.is_cancelled() {
            return Ok(WorkerEnd::Cancelled);
        }
        let ask = LeaseRequest {
            worker: settings.name.clone(),
            slot: slot.state(),
            checkout_path: slot.path().display().to_string(),
            scratch_path: scratch.display().to_string(),
        };
        let asked = tokio::select! {
            r = client.post("/v1/lease", serde_json::to_vec(&ask)?, Duration::from_secs(40)) => r,
            _ = cancel.cancelled() => return Ok(WorkerEnd::Cancelled),
        };
        let (status, body) = match asked {
            Ok(v) => {
                unreachable_since = None;
                v
            }
            Err(e @ RemoteError::Unreachable { .. }) => {
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > settings.give_up {
                    return Err(e.into());
                }
                tracing::warn!("{e}; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        match status {
            StatusCode::OK => {}
            StatusCode::NO_CONTENT => continue,
            StatusCode::GONE => return Ok(WorkerEnd::RunOver),
            StatusCode::UNAUTHORIZED => {
                return Err(RemoteError::Refused(String::from_utf8_lossy(&body).into_owned()).into())
            }
            other => bail!("the controller answered {other}: {}", String::from_utf8_lossy(&body)),
        }
        let job: Job = serde_json::from_slice(&body).context("the controller sent a job this worker cannot read")?;
        slot = run_job(&client, &host, slot, &scratch, &settings, tunnel_addr, job, &cancel).await?;
    }
}

/// Carries each connection on the tunnel's listener to the gateway, through the controller.
async fn serve_tunnel(listener: TcpListener, client: Arc<Client>) {
    loop {
        let Ok((mut local, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let client = client.clone();
        tokio::spawn(async move {
            if let Ok(upgraded) = client.tunnel().await {
                let mut remote = TokioIo::new(upgraded);
                let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
            }
        });
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    client: &Arc<Client>,
    host: &HostRuntime,
    slot: Slot,
    scratch: &std::path::Path,
    settings: &WorkerSettings,
    tunnel: SocketAddr,
    job: Job,
    cancel: &CancellationToken,
) -> Result<Slot> {
    let mut job = job;
    patch_scratch(&mut job, tunnel);
    let job = Arc::new(job);
    let (slot, scratch_dir) = {
        let (job, scratch) = (job.clone(), scratch.to_path_buf());
        tokio::task::spawn_blocking(move || -> Result<(Slot, Dir)> {
            let mut slot = slot;
            slot.apply(&job)?;
            let dir = Dir::open(&scratch)?;
            for (name, _) in dir.entries()? {
                dir.remove(&name)?;
            }
            files::apply(&dir, &job.scratch)?;
            Ok((slot, dir))
        })
        .await??
    };
    let mut spawn = spawn_of(&job, slot.path().to_path_buf(), settings, tunnel)?;
    // Each job gets a home of its own, emptied before it: a worker's
    // container serves task after task, and what one agent leaves in its home (a shell
    // profile, a git config) must not run in the next one's.
    if !spawn.invocation.env.iter().any(|(k, _)| k == "HOME") {
        let home = settings.dir.join("home");
        crate::git::safefs::remove_path(&home)?;
        std::fs::create_dir_all(&home)?;
        spawn.invocation.env.push(("HOME".into(), home.display().to_string()));
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let lost = Arc::new(AtomicBool::new(false));
    let stop = cancel.child_token();
    let forwarding = tokio::spawn(forward(client.clone(), job.clone(), rx, lost.clone(), stop.clone()));
    let exit = host.run(spawn, tx, stop.clone()).await;
    let _ = forwarding.await;
    let exit = WireExit::from(exit?);
    let agent = job.role == Role::Agent.as_str();
    let (changes, slot) = tokio::task::spawn_blocking(move || {
        let mut slot = slot;
        let changes = slot.scan(agent);
        (changes, slot)
    })
    .await?;
    let changes = changes?;
    tracing::info!(
        task = job.task,
        role = job.role,
        exit = ?exit,
        changed = ?changes.iter().map(|e| e.path.as_str()).collect::<Vec<_>>(),
        "job done"
    );
    if lost.load(Ordering::Relaxed) {
        tracing::warn!(task = job.task, "the lease was lost; the result is not sent");
        return Ok(slot);
    }
    let scratch_entries = match agent {
        true => changed_since(&job.scratch, files::read_all(&scratch_dir, 64 << 20)?),
        false => Vec::new(),
    };
    let result = JobResult {
        exit,
        changes: if agent { changes } else { Vec::new() },
        scratch: scratch_entries,
    };
    let path = format!("/v1/leases/{}/result", job.lease);
    let sent = send_result(client, &path, serde_json::to_vec(&result)?, settings.give_up, cancel).await?;
    let Some((status, body)) = sent else {
        return Ok(slot); // stopped meanwhile
    };
    if status != StatusCode::OK {
        tracing::warn!(
            task = job.task,
            "the controller refused the result ({status}): {}",
            String::from_utf8_lossy(&body)
        );
    }
    Ok(slot)
}

/// POSTs a job's result, again and again while the controller is out of reach, for up to
/// `give_up`: the agent's work is in it, and a connection that fails for a while (seen on
/// podman hosts while containers next to this one start or stop) must not throw it away.
/// A result that arrived although its answer was lost is refused the second time (409),
/// never taken twice. None: the worker was stopped meanwhile.
async fn send_result(
    client: &Client,
    path: &str,
    body: Vec<u8>,
    give_up: Duration,
    cancel: &CancellationToken,
) -> Result<Option<(StatusCode, bytes::Bytes)>> {
    let since = Instant::now();
    loop {
        match client.post(path, body.clone(), Duration::from_secs(600)).await {
            Ok(answer) => return Ok(Some(answer)),
            Err(e @ RemoteError::Unreachable { .. }) if since.elapsed() < give_up => {
                tracing::warn!("cannot send the result: {e}; trying again");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = cancel.cancelled() => return Ok(None),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What differs in `now` from what the job `sent` (the controller still has those): files
/// written or changed, and removals. codex's home is most of a scratch directory, and most of
/// it is what it was.
fn changed_since(sent: &[super::protocol::Entry], now: Vec<super::protocol::Entry>) -> Vec<super::protocol::Entry> {
    use super::protocol::{Entry, EntryKind};
    let before: std::collections::HashMap<&str, &Entry> = sent.iter().map(|e| (e.path.as_str(), e)).collect();
    let present: std::collections::HashSet<String> = now.iter().map(|e| e.path.clone()).collect();
    let mut out: Vec<Entry> = now
        .into_iter()
        .filter(|e| before.get(e.path.as_str()) != Some(&e))
        .collect();
    out.extend(
        sent.iter()
            .filter(|e| e.kind != EntryKind::Removed && !present.contains(&e.path))
            .map(|e| Entry {
                path: e.path.clone(),
                kind: EntryKind::Removed,
            }),
    );
    out
}

/// The agent's configuration in the scratch directory (codex's config.toml) names the
/// gateway at the address the controller chose; this worker's tunnel may listen elsewhere.
fn patch_scratch(job: &mut Job, tunnel: SocketAddr) {
    let ours = tunnel.to_string();
    let Some(named) = job.gateway.clone().filter(|n| *n != ours) else {
        return;
    };
    for e in &mut job.scratch {
        let Ok(Some(data)) = e.data() else { continue };
        if let Ok(text) = String::from_utf8(data) {
            if text.contains(&named) {
                let executable = matches!(e.kind, super::protocol::EntryKind::File { executable: true, .. });
                *e = super::protocol::Entry::file(e.path.clone(), text.replace(&named, &ours).as_bytes(), executable);
            }
        }
    }
}

fn spawn_of(job: &Job, workdir: PathBuf, settings: &WorkerSettings, tunnel: SocketAddr) -> Result<Spawn> {
    let ours = tunnel.to_string();
    let fix = |s: &str| match &job.gateway {
        Some(named) if *named != ours => s.replace(named.as_str(), &ours),
        _ => s.to_string(),
    };
    let stdin = match &job.stdin {
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .context("the job's stdin is not base64")?,
        ),
        None => None,
    };
    let caches = job
        .caches
        .iter()
        .map(|c| {
            let at = match c.base.as_str() {
                "home" => CachePath::Home(c.path.clone().into()),
                _ => CachePath::Workdir(c.path.clone().into()),
            };
            let name: String = c
                .name
                .chars()
                .map(|ch| {
                    if ch.is_ascii_alphanumeric() || ch == '-' {
                        ch
                    } else {
                        '_'
                    }
                })
                .collect();
            Cache {
                volume: c.name.clone(),
                host_dir: settings.dir.join("caches").join(name),
                at,
            }
        })
        .collect();
    Ok(Spawn {
        invocation: Invocation {
            program: fix(&job.program),
            args: job.args.iter().map(|a| fix(a)).collect(),
            env: job.env.iter().map(|(k, v)| (k.clone(), fix(v))).collect(),
            secret_env: job
                .secret_env
                .iter()
                .map(|(k, v)| (k.clone(), Secret::new(fix(v))))
                .collect(),
            stdin,
        },
        workdir,
        binds: Vec::new(),
        timeout: job.timeout_secs.map(Duration::from_secs),
        run_id: job.run_id.clone(),
        task: job.task,
        gateway_socket: None,
        role: if job.role == Role::Verify.as_str() {
            Role::Verify
        } else {
            Role::Agent
        },
        caches,
        tree: None,
        scratch: None,
    })
}

/// Sends the command's output in batches, and a heartbeat when it is quiet. A 409 means the
/// lease is gone (the controller gave the job to another worker, or it was cancelled): the
/// command is stopped.
async fn forward(
    client: Arc<Client>,
    job: Arc<Job>,
    mut rx: UnboundedReceiver<Output>,
    lost: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let beat = Duration::from_secs(job.heartbeat_secs.max(1));
    let mut last = Instant::now();
    let mut open = true;
    while open {
        let mut batch = OutputBatch::default();
        let deadline = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some(Output::Stdout(text)) => batch.lines.push(Line { err: false, text }),
                    Some(Output::Stderr(text)) => batch.lines.push(Line { err: true, text }),
                    Some(Output::Placed(_)) => {}
                    None => { open = false; break; }
                },
                _ = &mut deadline => break,
            }
            if batch.lines.len() >= 256 {
                break;
            }
        }
        if batch.lines.is_empty() && last.elapsed() < beat {
            continue;
        }
        let (path, body) = match batch.lines.is_empty() {
            true => (format!("/v1/leases/{}/heartbeat", job.lease), Vec::new()),
            false => (
                format!("/v1/leases/{}/output", job.lease),
                serde_json::to_vec(&batch).unwrap_or_default(),
            ),
        };
        match client.post(&path, body, Duration::from_secs(30)).await {
            Ok((StatusCode::CONFLICT, _)) => {
                lost.store(true, Ordering::Relaxed);
                stop.cancel();
            }
            Ok(_) => last = Instant::now(),
            Err(e) => tracing::warn!("cannot reach the controller: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::protocol::{Entry, EntryKind};
    use super::*;

    #[test]
    fn only_what_changed_in_the_scratch_directory_goes_back() {
        let sent = vec![
            Entry::file("prompt.txt", b"the task", false),
            Entry::file("codex/config.toml", b"model = 'x'", false),
            Entry::file("codex/state.sqlite", b"v1", false),
            Entry::file("gone.txt", b"x", false),
        ];
        let now = vec![
            Entry::file("prompt.txt", b"the task", false),
            Entry::file("codex/config.toml", b"model = 'x'", true), // its mode changed
            Entry::file("codex/state.sqlite", b"v2", false),
            Entry::file("last-message.txt", b"done", false),
        ];
        let mut back: Vec<(String, bool)> = changed_since(&sent, now)
            .into_iter()
            .map(|e| (e.path, e.kind == EntryKind::Removed))
            .collect();
        back.sort();
        assert_eq!(
            back,
            vec![
                ("codex/config.toml".into(), false),
                ("codex/state.sqlite".into(), false),
                ("gone.txt".into(), true),
                ("last-message.txt".into(), false),
            ]
        );
    }
}
