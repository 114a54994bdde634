//! The bridge inside a task container: the container's network is loopback
//! only, and the gateway's unix socket is mounted in. `cohort __bridge`
//! listens on the container's loopback and carries every TCP connection to a
//! new connection on that socket, bytes both ways, unread.

use std::net::SocketAddr;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use tokio::net::{TcpListener, UnixStream};

use super::GatewayError;

/// Serves until the process ends. Fails only when it cannot listen (or the
/// socket is missing at start); a connection that fails ends alone.
pub async fn bridge(listen: SocketAddr, socket: &Path) -> Result<(), GatewayError> {
    let listener = bind(listen, socket).await?;
    serve(listener, socket).await
}

/// Listens on `listen` for a bridge to `socket`, which must be a socket. Once this returns,
/// clients can connect (they wait in the backlog until [`serve`] takes them).
pub async fn bind(listen: SocketAddr, socket: &Path) -> Result<TcpListener, GatewayError> {
    let missing = |source| GatewayError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    // Say so at once when the mount is missing, not at the first request.
    if !std::fs::metadata(socket).map_err(missing)?.file_type().is_socket() {
        return Err(GatewayError::NotASocket {
            path: socket.to_path_buf(),
        });
    }
    TcpListener::bind(listen).await.map_err(|source| GatewayError::Listen {
        addr: listen.to_string(),
        source,
    })
}

/// Carries every connection on `listener` to a new connection on `socket`, until the process ends.
pub async fn serve(listener: TcpListener, socket: &Path) -> Result<(), GatewayError> {
    loop {
        let (mut tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                // Out of descriptors and the like: back off, keep serving.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let socket = socket.to_path_buf();
        tokio::spawn(async move {
            // The client sees its connection close when the gateway is unreachable.
            if let Ok(mut unix) = UnixStream::connect(&socket).await {
                let _ = tokio::io::copy_bidirectional(&mut tcp, &mut unix).await;
            }
        });
    }
}
