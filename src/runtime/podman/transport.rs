//! How a request reaches the service: a new unix or TCP connection each time, or a new
//! channel in the shared ssh session.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::net::{TcpStream, UnixStream};

use super::endpoint::Endpoint;
use super::error::{PodmanError, Result};
use super::ssh::{Io, SshConn};

/// How long a TCP connection to a remote service may take to open.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub(super) enum Transport {
    Unix(PathBuf),
    /// Plain HTTP: podman's TCP listener has neither encryption nor authentication.
    Tcp {
        host: String,
        port: u16,
    },
    Ssh(SshConn),
}

impl Transport {
    /// A new connection to the service; records this side's address on the first remote one
    /// in `local_ip`.
    pub(super) async fn stream(&self, endpoint: &Endpoint, local_ip: &OnceLock<IpAddr>) -> Result<Io> {
        Ok(match self {
            Transport::Unix(path) => {
                let stream = UnixStream::connect(path).await.map_err(|source| PodmanError::Connect {
                    path: path.clone(),
                    source,
                })?;
                Box::new(stream) as Io
            }
            Transport::Tcp { host, port } => {
                let remote = |message: String| PodmanError::Remote {
                    endpoint: endpoint.to_string(),
                    message,
                };
                let fix = "is `podman system service tcp://ADDR:PORT` running there and the port reachable?";
                let connect = TcpStream::connect((host.as_str(), *port));
                let stream = match tokio::time::timeout(TCP_CONNECT_TIMEOUT, connect).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => return Err(remote(format!("cannot connect: {e}; {fix}"))),
                    Err(_) => {
                        let secs = TCP_CONNECT_TIMEOUT.as_secs();
                        return Err(remote(format!("no connection within {secs}s; {fix}")));
                    }
                };
                let _ = stream.set_nodelay(true);
                if let Ok(addr) = stream.local_addr() {
                    local_ip.get_or_init(|| addr.ip());
                }
                Box::new(stream)
            }
            Transport::Ssh(conn) => {
                let (io, ip) = conn.open().await?;
                local_ip.get_or_init(|| ip);
                io
            }
        })
    }
}
