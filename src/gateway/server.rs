//! Listeners, connections and the one dispatch every request goes through.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::oneshot;

use super::{egress, proxy, GatewayError, Shared};

/// What every handler answers with: streamed answers pass through as they arrive.
pub(crate) type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How long shutdown lets a request in flight (a long SSE answer) go on.
const GRACE: Duration = Duration::from_secs(5);

/// Binds the listeners here (so that errors come back to the caller), then
/// serves them from a thread of its own with a single-threaded runtime; the
/// receiver fires when that thread has finished after a stop.
///
/// A thread of its own: streamed answers hop between the endpoint's
/// connection, the meter and the agent's connection once per SSE event, and
/// on one thread those hops are cheap, where on a multi-threaded runtime each
/// may wake another thread. It also keeps the agents' model traffic from
/// waiting behind whatever else the orchestrator's runtime is busy with. One
/// thread is plenty: a few microseconds per event.
pub(crate) fn start(
    shared: Arc<Shared>,
    tcp: Option<SocketAddr>,
    socket: Option<&Path>,
) -> Result<(Option<SocketAddr>, oneshot::Receiver<()>), GatewayError> {
    let tcp = match tcp {
        Some(want) => {
            let listen = |source| GatewayError::Listen {
                addr: want.to_string(),
                source,
            };
            let listener = std::net::TcpListener::bind(want).map_err(listen)?;
            listener.set_nonblocking(true).map_err(listen)?;
            let addr = listener.local_addr().map_err(listen)?;
            Some((listener, addr))
        }
        None => None,
    };
    let addr = tcp.as_ref().map(|(_, addr)| *addr);
    let unix = match socket {
        Some(path) => Some(bind_unix(path)?),
        None => None,
    };
    // The runtime is made on the new thread: dropping one (on an error) is
    // not allowed inside another runtime, where the caller may well be.
    let (ready, started) = std::sync::mpsc::sync_channel::<Result<(), GatewayError>>(1);
    let (done, finished) = oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("cohort-gateway".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready.send(Err(GatewayError::Thread(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let registered = (|| -> std::io::Result<_> {
                    let tcp = tcp.map(|(l, _)| TcpListener::from_std(l)).transpose()?;
                    let unix = unix.map(UnixListener::from_std).transpose()?;
                    Ok((tcp, unix))
                })();
                let (tcp, unix) = match registered {
                    Ok(pair) => pair,
                    Err(e) => {
                        let _ = ready.send(Err(GatewayError::Thread(e)));
                        return;
                    }
                };
                if let Some(listener) = tcp {
                    serve_tcp(listener, shared.clone());
                }
                if let Some(listener) = unix {
                    serve_unix(listener, shared.clone());
                }
                let _ = ready.send(Ok(()));
                shared.stop.cancelled().await;
                shared.tasks.close();
                shared.tasks.wait().await;
                shared.upstream.close_idle();
            });
            let _ = done.send(());
        });
    let outcome = match spawned {
        Err(e) => Err(GatewayError::Thread(e)),
        // A short wait, once per gateway: the thread's first steps.
        Ok(_) => started.recv().unwrap_or_else(|_| {
            Err(GatewayError::Thread(std::io::Error::other(
                "the gateway's thread ended at start",
            )))
        }),
    };
    if let Err(e) = outcome {
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        return Err(e);
    }
    Ok((addr, finished))
}

fn serve_tcp(listener: TcpListener, shared: Arc<Shared>) {
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, _)) => {
                    // Small requests and SSE events must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    serve_connection(stream, shared.clone());
                }
                Err(e) => accept_failed(&e).await,
            }
        }
    });
}

/// Binds `path`, replacing a stale socket (never another kind of file), mode 0666.
fn bind_unix(path: &Path) -> Result<std::os::unix::net::UnixListener, GatewayError> {
    let listen = |source| GatewayError::Listen {
        addr: path.display().to_string(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(listen)?,
        Ok(_) => {
            return Err(GatewayError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(listen(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    // A container's user has another uid; the per-task tokens keep others out.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(listen)?;
    Ok(listener)
}

fn serve_unix(listener: UnixListener, shared: Arc<Shared>) {
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shared.stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, _)) => serve_connection(stream, shared.clone()),
                Err(e) => accept_failed(&e).await,
            }
        }
    });
}

async fn accept_failed(e: &std::io::Error) {
    // Out of file descriptors and the like: back off instead of spinning.
    tracing::warn!("the model gateway cannot accept a connection: {e}");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn serve_connection<I>(io: I, shared: Arc<Shared>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        let stop = shared.stop.clone();
        let svc = hyper::service::service_fn(move |req| dispatch(shared.clone(), req));
        let conn = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(io), svc)
            .with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            // Errors are clients hanging up, which agents do when killed.
            _ = conn.as_mut() => return,
            _ = stop.cancelled() => {}
        }
        conn.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(GRACE, conn).await;
    });
}

async fn dispatch(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let response = if req.method() == Method::CONNECT {
        egress::connect(&shared, req).await
    } else if req.uri().scheme().is_some() {
        // Absolute form: a plain-HTTP proxy request.
        egress::plain(&shared, req).await
    } else if req.uri().path() == "/v1" || req.uri().path().starts_with("/v1/") {
        proxy::forward(&shared, req).await
    } else {
        api_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "not_found",
            &format!("cohort: the model gateway serves /v1/..., not {}", req.uri().path()),
        )
    };
    Ok(response)
}

pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

pub(crate) fn empty() -> Body {
    full(Bytes::new())
}

/// The OpenAI error shape, which agents show: `{"error": {message, type, code}}`.
pub(crate) fn api_error(status: StatusCode, kind: &str, code: &str, message: &str) -> Response<Body> {
    let body = serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A plain-text answer (the proxy's refusals, for curl and git to print).
pub(crate) fn text(status: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(full(message + "\n"));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
