//! Exec sessions: run commands in a running container, attached or interactive.

use std::time::Duration;

use hyper::header::{CONNECTION, CONTENT_TYPE, HOST, UPGRADE};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::client::{empty, enc, json_body, Body, IdBody, Podman, API_PREFIX};
use super::error::{PodmanError, Result};
use super::stream::ExecSession;
use super::types::{ExecCreateBody, ExecInspect, ExecOutput, ExecSpec};

impl Podman {
    /// Create an exec session in a running container; returns its ID.
    pub async fn exec_create(&self, id: &str, spec: &ExecSpec) -> Result<String> {
        let path = format!("{API_PREFIX}/containers/{}/exec", enc(id));
        let body = json_body(&ExecCreateBody {
            attach_stdin: spec.stdin,
            attach_stdout: true,
            attach_stderr: true,
            cmd: &spec.cmd,
            env: &spec.env,
            working_dir: spec.workdir.as_deref(),
            user: spec.user.as_deref(),
            tty: spec.tty,
        })?;
        let bytes = self.call(Method::POST, &path, body, Some("application/json")).await?;
        Ok(serde_json::from_slice::<IdBody>(&bytes)?.id)
    }

    /// Start an exec session attached: podman answers `101` and hands over the connection,
    /// which carries the process's output (framed unless `tty`) and, if attached, its stdin.
    pub async fn exec_start(&self, exec_id: &str, tty: bool) -> Result<ExecSession> {
        let path = format!("{API_PREFIX}/exec/{}/start", enc(exec_id));
        let body = json_body(&serde_json::json!({ "Detach": false, "Tty": tty }))?;
        self.upgrade(&path, body, "exec start", exec_id, tty).await
    }

    /// Attach to a container's main process (stdin, stdout, stderr). On a container that is
    /// created but not started, podman initializes it first, so nothing it prints is missed
    /// when it is started afterwards. Half-closing the write side closes the process's stdin
    /// (the container must be created with `stdin`).
    pub async fn attach_container(&self, id: &str, stdin: bool) -> Result<ExecSession> {
        let path = format!(
            "{API_PREFIX}/containers/{}/attach?stream=true&stdin={stdin}&stdout=true&stderr=true",
            enc(id)
        );
        self.upgrade(&path, empty(), "attach", id, false).await
    }

    async fn upgrade(&self, path: &str, body: Body, what: &str, id: &str, tty: bool) -> Result<ExecSession> {
        let mut sender = self.open().await?;
        let req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, "d")
            .header(CONTENT_TYPE, "application/json")
            .header(CONNECTION, "Upgrade")
            .header(UPGRADE, "tcp")
            .body(body)?;
        let res = sender.send_request(req).await?;
        let res = self.check(Method::POST, path, res).await?;
        if res.status() != StatusCode::SWITCHING_PROTOCOLS {
            return Err(PodmanError::Protocol(format!(
                "{what} answered {} instead of 101",
                res.status()
            )));
        }
        let upgraded = hyper::upgrade::on(res).await?;
        Ok(ExecSession {
            io: TokioIo::new(upgraded),
            tty,
            exec_id: id.to_owned(),
        })
    }

    pub async fn exec_inspect(&self, exec_id: &str) -> Result<ExecInspect> {
        self.get_json(&format!("{API_PREFIX}/exec/{}/json", enc(exec_id))).await
    }

    /// Resize an exec's TTY.
    pub async fn exec_resize(&self, exec_id: &str, height: u16, width: u16) -> Result<()> {
        let path = format!("{API_PREFIX}/exec/{}/resize?h={height}&w={width}", enc(exec_id));
        self.call(Method::POST, &path, empty(), None).await.map(|_| ())
    }

    /// The exit code of a finished exec. The output stream can close a moment before podman
    /// records the exit, so poll briefly while it still reports running.
    pub async fn exec_exit_code(&self, exec_id: &str) -> Result<i64> {
        for _ in 0..500 {
            let info = self.exec_inspect(exec_id).await?;
            if !info.running {
                return Ok(info.exit_code);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(PodmanError::Protocol(format!(
            "exec {exec_id} still running after its output closed"
        )))
    }

    /// Run a command to completion in a running container and collect its output.
    /// stdin, if attached, is closed right away.
    pub async fn exec(&self, id: &str, spec: &ExecSpec) -> Result<ExecOutput> {
        let exec_id = self.exec_create(id, spec).await?;
        let mut session = self.exec_start(&exec_id, spec.tty).await?;
        if spec.stdin {
            session.close_stdin().await?;
        }
        let (stdout, stderr) = session.collect().await?;
        let exit_code = self.exec_exit_code(&exec_id).await?;
        Ok(ExecOutput {
            exit_code,
            stdout,
            stderr,
        })
    }
}
