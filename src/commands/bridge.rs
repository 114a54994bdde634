//! `cohort __bridge --listen 127.0.0.1:PORT --socket PATH` (hidden): run inside
//! a task container, it carries the container's loopback port to the model
//! gateway's unix socket (see `gateway::bridge`). Silent while it works.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The loopback address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    pub listen: SocketAddr,
    /// The gateway's unix socket, as mounted in the container.
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,
}

pub async fn run(args: Args) -> Result<u8> {
    crate::gateway::bridge(args.listen, &args.socket).await?;
    Ok(0)
}
