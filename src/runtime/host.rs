//! Running the agent as a process on the host, in its checkout.

use std::process::Stdio;

use anyhow::{Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::{Exit, Output, Runtime, Spawn};
use crate::secret::Secret;

pub struct HostRuntime {
    /// Values no agent may inherit from cohort's environment (the API key, wherever the
    /// user exported it): the agent reaches the model through the gateway instead.
    hide: Vec<Secret>,
}

impl HostRuntime {
    pub fn new(hide: Vec<Secret>) -> Result<HostRuntime> {
        Ok(HostRuntime { hide })
    }
}

fn kill_group(pgid: u32) {
    // ESRCH (nothing left in the group) is the normal case.
    let _ = killpg(Pid::from_raw(pgid as i32), Signal::SIGKILL);
}

/// Stops an agent that is still running: its guard (the child, leading the
/// group) is asked to kill everything below it, which also reaches what left
/// the group; a plain group kill would take the guard first. The group kill
/// follows if the guard does not exit in time.
async fn stop(guard: &mut tokio::process::Child, pgid: u32) {
    let _ = nix::sys::signal::kill(Pid::from_raw(pgid as i32), Signal::SIGTERM);
    if tokio::time::timeout(std::time::Duration::from_secs(5), guard.wait())
        .await
        .is_err()
    {
        kill_group(pgid);
        let _ = guard.wait().await;
    }
}

/// Reads one of the agent's pipes to its end, as bytes (see `lines`).
fn forward<R: AsyncRead + Unpin + Send + 'static>(
    reader: R,
    tx: UnboundedSender<Output>,
    wrap: fn(String) -> Output,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(super::lines::forward(reader, tx, wrap))
}

#[async_trait::async_trait]
impl Runtime for HostRuntime {
    fn name(&self) -> &'static str {
        "host"
    }

    async fn run(&self, spawn: Spawn, output: UnboundedSender<Output>, cancel: CancellationToken) -> Result<Exit> {
        let placed = super::host_caches::place(&spawn.workdir, &spawn.caches)?;
        let exit = self.run_process(&spawn, output, cancel).await;
        super::host_caches::restore(placed);
        exit
    }
}

impl HostRuntime {
    async fn run_process(
        &self,
        spawn: &Spawn,
        output: UnboundedSender<Output>,
        cancel: CancellationToken,
    ) -> Result<Exit> {
        let inv = &spawn.invocation;
        let mut cmd = Command::new(&inv.program);
        cmd.args(&inv.args);
        cmd.current_dir(&spawn.workdir);
        // A secret reaches the child only under the names the agent chose: drop inherited
        // variables holding the same value, or the key (OPENAI_API_KEY in the user's shell).
        for (name, value) in std::env::vars_os() {
            if inv
                .secret_env
                .iter()
                .map(|(_, s)| s)
                .chain(&self.hide)
                .any(|s| !s.is_empty() && value.as_encoded_bytes() == s.expose().as_bytes())
            {
                cmd.env_remove(name);
            }
        }
        cmd.envs(inv.env.iter().map(|(k, v)| (k, v)));
        for (k, v) in &inv.secret_env {
            cmd.env(k, v.expose());
        }
        cmd.stdin(if inv.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd.process_group(0);
        let parent = std::process::id() as i32;
        // The death signal follows the thread that forks, not the process:
        // agents are started from tokio's worker threads, which live as long
        // as the runtime (nothing calls block_in_place on one).
        unsafe {
            // The guard stays behind in this process; the agent is its child.
            cmd.pre_exec(move || super::guard::split_off_guard(parent));
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            // The exec failed in the agent's process (no such program, not
            // executable): a failed task, as a shell would report it, not a
            // failed run.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
                ) =>
            {
                let _ = output.send(Output::Stderr(format!(
                    "cohort: cannot start agent {:?}: {e}",
                    inv.program
                )));
                return Ok(Exit::Code(127));
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot start the agent {:?} in {}",
                        inv.program,
                        spawn.workdir.display()
                    )
                })
            }
        };
        let pgid = child.id().context("the agent exited before it could be watched")?;
        let out = forward(child.stdout.take().unwrap(), output.clone(), Output::Stdout);
        let err = forward(child.stderr.take().unwrap(), output, Output::Stderr);
        if let (Some(mut stdin), Some(data)) = (child.stdin.take(), inv.stdin.clone()) {
            tokio::spawn(async move {
                let _ = stdin.write_all(&data).await;
                let _ = stdin.shutdown().await;
            });
        }

        let deadline = async {
            match spawn.timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let exit = tokio::select! {
            status = child.wait() => {
                let status = status?;
                use std::os::unix::process::ExitStatusExt;
                match (status.code(), status.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    _ => Exit::Code(-1),
                }
            }
            _ = deadline => {
                stop(&mut child, pgid).await;
                Exit::TimedOut(spawn.timeout.unwrap_or_default())
            }
            _ = cancel.cancelled() => {
                stop(&mut child, pgid).await;
                Exit::Cancelled
            }
        };
        // Whatever the agent left running in its group goes too.
        kill_group(pgid);
        // A process that escaped the group may hold the pipes open: don't wait forever.
        // The forwarders go then, or the task would wait on the output
        // channel for as long as that process lives.
        let (mut out, mut err) = (out, err);
        let drain = async {
            let _ = (&mut out).await;
            let _ = (&mut err).await;
        };
        if tokio::time::timeout(std::time::Duration::from_secs(2), drain)
            .await
            .is_err()
        {
            out.abort();
            err.abort();
        }
        Ok(exit)
    }
}
