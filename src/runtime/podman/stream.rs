//! Attached streams: podman's multiplexed frame format and the upgraded exec connection.
//!
//! Without a TTY, podman frames output like Docker: an 8-byte header
//! `[stream, 0, 0, 0, len_be32]` then `len` bytes; stream 1 is stdout, 2 stderr, 3 an error
//! from the engine. With a TTY the stream is raw bytes.

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::error::{io_err, PodmanError, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// An error message from the engine, in-band.
    System,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub stream: StreamKind,
    pub data: Vec<u8>,
}

fn kind(b: u8) -> Result<StreamKind> {
    Ok(match b {
        0 => StreamKind::Stdin,
        1 => StreamKind::Stdout,
        2 => StreamKind::Stderr,
        3 => StreamKind::System,
        other => {
            return Err(PodmanError::Protocol(format!(
                "unknown stream type {other} in multiplexed output"
            )))
        }
    })
}

/// Split a complete multiplexed body (e.g. from `logs`) into frames.
pub fn demux(mut bytes: &[u8]) -> Result<Vec<Frame>> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 8 {
            return Err(PodmanError::Protocol("truncated frame header".into()));
        }
        let len = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
        let stream = kind(bytes[0])?;
        let body = bytes
            .get(8..8 + len)
            .ok_or_else(|| PodmanError::Protocol("truncated frame body".into()))?;
        out.push(Frame {
            stream,
            data: body.to_vec(),
        });
        bytes = &bytes[8 + len..];
    }
    Ok(out)
}

/// A started exec: the connection podman upgraded for it. Read output with
/// [`next_frame`](Self::next_frame); write stdin (when the exec attached it) with
/// [`write_stdin`](Self::write_stdin). For an interactive TTY, take the raw stream with
/// [`into_io`](Self::into_io) and copy it to and from the terminal.
pub struct ExecSession {
    pub(crate) io: TokioIo<Upgraded>,
    pub(crate) tty: bool,
    pub(crate) exec_id: String,
}

impl std::fmt::Debug for ExecSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecSession")
            .field("exec_id", &self.exec_id)
            .field("tty", &self.tty)
            .finish()
    }
}

impl ExecSession {
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// The next chunk of output; `None` when the process closed its output.
    /// With a TTY every chunk is reported as stdout.
    pub async fn next_frame(&mut self) -> Result<Option<Frame>> {
        if self.tty {
            let mut buf = vec![0u8; 16 * 1024];
            let n = self.io.read(&mut buf).await.map_err(io_err("reading exec output"))?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            return Ok(Some(Frame {
                stream: StreamKind::Stdout,
                data: buf,
            }));
        }
        let mut header = [0u8; 8];
        // EOF exactly at a frame boundary is the normal end of the stream.
        let first = self
            .io
            .read(&mut header[..1])
            .await
            .map_err(io_err("reading exec output"))?;
        if first == 0 {
            return Ok(None);
        }
        self.io
            .read_exact(&mut header[1..])
            .await
            .map_err(io_err("reading exec frame header"))?;
        let len = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let mut data = vec![0u8; len];
        self.io
            .read_exact(&mut data)
            .await
            .map_err(io_err("reading exec frame"))?;
        Ok(Some(Frame {
            stream: kind(header[0])?,
            data,
        }))
    }

    pub async fn write_stdin(&mut self, data: &[u8]) -> Result<()> {
        self.io.write_all(data).await.map_err(io_err("writing exec stdin"))?;
        self.io.flush().await.map_err(io_err("writing exec stdin"))
    }

    /// Half-close: the process sees end of input, output keeps flowing.
    pub async fn close_stdin(&mut self) -> Result<()> {
        self.io.shutdown().await.map_err(io_err("closing exec stdin"))
    }

    /// Read everything until the process closes its output. Engine errors become an error.
    pub async fn collect(&mut self) -> Result<(Vec<u8>, Vec<u8>)> {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(f) = self.next_frame().await? {
            match f.stream {
                StreamKind::Stdout => out.extend_from_slice(&f.data),
                StreamKind::Stderr => err.extend_from_slice(&f.data),
                StreamKind::System => return Err(PodmanError::Protocol(String::from_utf8_lossy(&f.data).into_owned())),
                StreamKind::Stdin => {}
            }
        }
        Ok((out, err))
    }

    /// The raw bidirectional stream (implements tokio's AsyncRead + AsyncWrite).
    pub fn into_io(self) -> TokioIo<Upgraded> {
        self.io
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demux_frames() {
        let mut b = vec![1, 0, 0, 0, 0, 0, 0, 3];
        b.extend_from_slice(b"out");
        b.extend_from_slice(&[2, 0, 0, 0, 0, 0, 0, 2]);
        b.extend_from_slice(b"er");
        let f = demux(&b).unwrap();
        assert_eq!(
            f[0],
            Frame {
                stream: StreamKind::Stdout,
                data: b"out".to_vec()
            }
        );
        assert_eq!(
            f[1],
            Frame {
                stream: StreamKind::Stderr,
                data: b"er".to_vec()
            }
        );
        assert!(demux(&b[..5]).is_err());
        assert!(demux(&b[..10]).is_err());
    }
}
