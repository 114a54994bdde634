//! `cohort __bridge --listen 127.0.0.1:PORT --socket PATH [-- AGENT ARGS…]` (hidden): run
//! inside a task container, it carries the container's loopback port to the model gateway's
//! unix socket (see `gateway::bridge`). Silent while it works.
//!
//! With a command after `--`, it first listens, then runs that command (the agent) with this
//! process's standard streams and ends with its exit code: the agent's first request cannot
//! come before the bridge is there, and nothing is left running when the agent ends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The loopback address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The gateway's unix socket, as mounted in the container.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
    /// The agent to run once the bridge listens (its exit code becomes this one's).
    #[arg(last = true, value_name = "AGENT")]
    pub command: Vec<String>,
}

pub async fn run(args: Args) -> Result<u8> {
    let Some((program, rest)) = args.command.split_first() else {
        crate::gateway::bridge(args.listen, &args.socket).await?;
        return Ok(0);
    };
    let listener = crate::gateway::bridging::bind(args.listen, &args.socket).await?;
    let socket = args.socket.clone();
    tokio::spawn(async move { crate::gateway::bridging::serve(listener, &socket).await });
    let status = tokio::process::Command::new(program)
        .args(rest)
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .await
        .with_context(|| format!("cannot start the agent {program:?}"))?;
    use std::os::unix::process::ExitStatusExt;
    let code = match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(sig)) => 128 + sig,
        _ => 1,
    };
    Ok(u8::try_from(code).unwrap_or(1))
}
