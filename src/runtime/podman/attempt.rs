//! One task attempt in its own container: create (one at a time), the idmapped views, attach,
//! start, the key and the prompt down stdin, the output, the exit code; removal in the
//! background. The spec and the views come from `runtime`.

use anyhow::{Context, Result};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::runtime::lines::LineSplitter;

/// Why an attempt failed: starting the container, or anything else.
pub(super) enum Failed {
    Start(anyhow::Error),
    Other(anyhow::Error),
}

impl Failed {
    pub(super) fn into_inner(self) -> anyhow::Error {
        match self {
            Failed::Start(e) | Failed::Other(e) => e,
        }
    }
}

impl From<anyhow::Error> for Failed {
    fn from(e: anyhow::Error) -> Self {
        Failed::Other(e)
    }
}

impl PodmanRuntime {
    /// One container: create, idmapped views, the agent as its main process, removal.
    pub(super) async fn attempt(
        &self,
        spawn: &Spawn,
        prepared: Prepared,
        output: UnboundedSender<Output>,
        cancel: &CancellationToken,
    ) -> std::result::Result<Exit, Failed> {
        let stage = prepared.stage.clone();
        let created = {
            let _one_at_a_time = self.creates.lock().await;
            #[cfg(test)]
            {
                let now = self.creating.0.fetch_add(1, Ordering::SeqCst) + 1;
                self.creating.1.fetch_max(now, Ordering::SeqCst);
            }
            let created = self.podman.create_container(&prepared.spec).await;
            #[cfg(test)]
            self.creating.0.fetch_sub(1, Ordering::SeqCst);
            created
        }
        .with_context(|| format!("cannot create a container from {}", self.settings.image));
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                if let Some(stage) = &stage {
                    remove_stage(stage);
                }
                return Err(e.into());
            }
        };
        let result = match self.idmap_views(&id, &prepared).await {
            Ok(views) => {
                let r = self.run_main(&id, spawn, prepared.stdin, output, cancel).await;
                // The container's mount namespace holds its own binds; ours go after it.
                drop(views);
                r
            }
            Err(e) => Err(Failed::Other(e)),
        };
        // Always removed, also after an error or a kill; the work stays in the checkout.
        self.remove_later(id, stage);
        result
    }

    /// Attach, start, feed stdin, stream the output, the exit code. Errors attaching or
    /// starting (podman initializes the container on attach) are [`Failed::Start`].
    async fn run_main(
        &self,
        id: &str,
        spawn: &Spawn,
        stdin: Option<Vec<u8>>,
        output: UnboundedSender<Output>,
        cancel: &CancellationToken,
    ) -> std::result::Result<Exit, Failed> {
        let session = match self.podman.attach_container(id, stdin.is_some()).await {
            Ok(s) => s,
            Err(e) => return Err(Failed::Start(e.into())),
        };
        if let Err(e) = self.podman.start_container(id).await {
            return Err(Failed::Start(e.into()));
        }
        let (mut reader, mut writer) = tokio::io::split(session.into_io());
        let feeding = tokio::spawn(async move {
            if let Some(data) = stdin {
                let _ = writer.write_all(&data).await;
                let _ = writer.flush().await;
                // Half-close: the process's stdin ends here.
                let _ = writer.shutdown().await;
            }
            // Keep the write half alive until the read side is done.
            writer
        });
        let pump = pump_output(&mut reader, output);
        let deadline = async {
            match spawn.timeout {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        let exit = tokio::select! {
            r = pump => {
                r?;
                Exit::Code(self.podman.wait_container(id).await.map_err(anyhow::Error::from)? as i32)
            }
            _ = deadline => {
                let _ = self.podman.kill_container(id, "SIGKILL").await;
                Exit::TimedOut(spawn.timeout.unwrap_or_default())
            }
            _ = cancel.cancelled() => {
                let _ = self.podman.kill_container(id, "SIGKILL").await;
                Exit::Cancelled
            }
        };
        feeding.abort();
        Ok(exit)
    }
}

/// The main process's prelude when it has secrets: `KEY=VALUE` lines from stdin into the
/// environment, up to an empty line, then the agent (`"$@"`) with the rest of stdin. `read`
/// takes a pipe byte by byte, so none of the agent's input is consumed.
pub(super) const READ_SECRETS: &str = r#"while IFS= read -r kv && [ -n "$kv" ]; do export "$kv"; done; exec "$@""#;

/// Reads the multiplexed exec stream, sending complete lines per stream (see `lines`: bytes,
/// not text); a last partial line is sent at the end. Engine errors (stream 3) become an error.
async fn pump_output<R: AsyncRead + Unpin>(reader: &mut R, output: UnboundedSender<Output>) -> Result<()> {
    let mut splitters: [LineSplitter; 2] = Default::default();
    let send = |which: usize| {
        let output = output.clone();
        move |text: String| {
            let _ = output.send(if which == 0 {
                Output::Stdout(text)
            } else {
                Output::Stderr(text)
            });
        }
    };
    loop {
        let mut header = [0u8; 8];
        let n = reader
            .read(&mut header[..1])
            .await
            .context("reading the agent's output")?;
        if n == 0 {
            break;
        }
        reader
            .read_exact(&mut header[1..])
            .await
            .context("reading the agent's output")?;
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        // Frames are read in bounded pieces: a frame's length is the engine's, its bytes the agent's.
        let which = match header[0] {
            1 => Some(0),
            2 => Some(1),
            3 => {
                let mut data = vec![0u8; len.min(64 * 1024)];
                reader
                    .read_exact(&mut data)
                    .await
                    .context("reading the agent's output")?;
                anyhow::bail!("podman: {}", String::from_utf8_lossy(&data).trim());
            }
            _ => None,
        };
        let mut left = len;
        let mut chunk = vec![0u8; len.min(64 * 1024)];
        while left > 0 {
            let n = left.min(chunk.len());
            reader
                .read_exact(&mut chunk[..n])
                .await
                .context("reading the agent's output")?;
            if let Some(w) = which {
                splitters[w].push(&chunk[..n], send(w));
            }
            left -= n;
        }
    }
    for (which, s) in splitters.iter_mut().enumerate() {
        s.finish(send(which));
    }
    Ok(())
}
