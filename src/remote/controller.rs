//! The controller's HTTPS listener: workers lease jobs, stream output, send results and
//! tunnel their agents' model calls to the run's gateway; podman hosts pull the run's image.
//! See `protocol` for the routes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::protocol::{check_path, JobResult, LeaseRequest, OutputBatch, MAX_BODY_BYTES, MAX_RESULT_ENTRIES};
use super::queue::{Finished, Queue, Work};
use super::registry::Registry;
use super::tls::Identity;
use super::token::WorkerToken;
use super::{lock, trees, RemoteError};
use crate::runtime::Output;

type Body = Full<Bytes>;

/// How long a worker's request for work is held open when there is none.
const LONG_POLL: Duration = Duration::from_secs(20);

pub struct ControllerSettings {
    pub listen: SocketAddr,
    /// The repository (its git dir), whose trees jobs are made of.
    pub repo: PathBuf,
    /// A worker silent this long loses its job.
    pub worker_timeout: Duration,
}

/// A running controller; it stops when dropped.
pub struct Controller {
    ctl: Arc<Ctl>,
}

struct Ctl {
    addr: SocketAddr,
    fingerprint: String,
    /// The run being served and its token; None between runs (workers are told to leave).
    scope: Mutex<Option<(String, WorkerToken)>>,
    queue: Mutex<Queue>,
    wake: Notify,
    /// The repository, opened once: every job's files are made from it.
    repo: gix::ThreadSafeRepository,
    gateway: Mutex<Option<PathBuf>>,
    timeout: Duration,
    /// The run's image, for podman hosts to pull (`/v2/`).
    registry: Mutex<Option<Arc<Registry>>>,
    /// Requests for work being answered (see [`Controller::drained`]).
    polling: std::sync::atomic::AtomicUsize,
    stop: CancellationToken,
}

/// Counts a request for work while it is answered.
struct Polling<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Polling<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Polling(n)
    }
}

impl Drop for Polling<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Controller {
    pub async fn start(settings: ControllerSettings) -> Result<Controller, RemoteError> {
        let identity = Identity::generate()?;
        let tls = TlsAcceptor::from(identity.server_config()?);
        let listen = |source| RemoteError::Listen {
            addr: settings.listen.to_string(),
            source,
        };
        let repo = crate::git::open(&settings.repo)
            .map_err(|e| RemoteError::Repository(format!("{e:#}")))?
            .into_sync();
        let listener = TcpListener::bind(settings.listen).await.map_err(listen)?;
        let addr = listener.local_addr().map_err(listen)?;
        let ctl = Arc::new(Ctl {
            addr,
            fingerprint: identity.fingerprint(),
            scope: Mutex::new(None),
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            repo,
            gateway: Mutex::new(None),
            timeout: settings.worker_timeout,
            registry: Mutex::new(None),
            polling: Default::default(),
            stop: CancellationToken::new(),
        });
        tokio::spawn(accept(listener, tls, ctl.clone()));
        tokio::spawn(reap(ctl.clone()));
        Ok(Controller { ctl })
    }

    pub fn addr(&self) -> SocketAddr {
        self.ctl.addr
    }

    pub fn fingerprint(&self) -> &str {
        &self.ctl.fingerprint
    }

    /// Starts serving `run_id` with a new worker token, written to the run's directory
    /// (`worker-token`, mode 0600, and `controller.json`) for workers started elsewhere.
    pub fn open_run(&self, run_id: &str, run_dir: &Path) -> Result<WorkerToken, RemoteError> {
        let token = WorkerToken::generate(&self.ctl.fingerprint);
        let url = format!("https://{}", self.ctl.addr);
        let info = serde_json::json!({"url": url, "fingerprint": self.ctl.fingerprint, "run": run_id});
        write_private(&run_dir.join("worker-token"), token.to_secret().expose().as_bytes())?;
        write_private(&run_dir.join("controller.json"), info.to_string().as_bytes())?;
        *lock(&self.ctl.scope) = Some((run_id.to_string(), token.clone()));
        Ok(token)
    }

    /// Stops serving the run: its token dies, and workers asking for work are told to leave.
    pub fn close_run(&self, run_dir: Option<&Path>) {
        *lock(&self.ctl.scope) = None;
        if let Some(dir) = run_dir {
            let _ = std::fs::remove_file(dir.join("worker-token"));
        }
        self.ctl.wake.notify_waiters();
    }

    /// Waits (a little) until the workers waiting for work have been told the run is over:
    /// a process that exits right after [`Controller::close_run`] would cut those answers
    /// off, and a worker would take the dropped connection for an error.
    pub async fn drained(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.ctl.polling.load(std::sync::atomic::Ordering::SeqCst) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The last answers are on their way out of their connections.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Serves `registry` (the run's image, read-only) at `/v2/`.
    pub fn set_registry(&self, registry: Arc<Registry>) {
        *lock(&self.ctl.registry) = Some(registry);
    }

    /// The bytes of image blobs served so far.
    pub fn image_bytes_served(&self) -> u64 {
        lock(&self.ctl.registry).as_ref().map_or(0, |r| r.served().blob_bytes)
    }

    /// Where agents' tunnels go: the run gateway's socket.
    pub fn set_gateway(&self, socket: &Path) {
        let mut g = lock(&self.ctl.gateway);
        if g.as_deref() != Some(socket) {
            *g = Some(socket.to_path_buf());
        }
    }

    /// Queues a job; the receiver learns how it ended.
    pub fn submit(&self, mut work: Work) -> (u64, tokio::sync::oneshot::Receiver<Finished>) {
        let (done, rx) = tokio::sync::oneshot::channel();
        work.done = Some(done);
        let id = lock(&self.ctl.queue).push(work);
        self.ctl.wake.notify_waiters();
        (id, rx)
    }

    pub fn cancel(&self, id: u64) {
        lock(&self.ctl.queue).cancel(id);
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.ctl.stop.cancel();
    }
}

/// [`super::write_private`], with the error this module reports.
fn write_private(path: &Path, data: &[u8]) -> Result<(), RemoteError> {
    super::write_private(path, data).map_err(|source| RemoteError::Write {
        path: path.to_path_buf(),
        source,
    })
}

async fn accept(listener: TcpListener, tls: TlsAcceptor, ctl: Arc<Ctl>) {
    loop {
        let accepted = tokio::select! {
            _ = ctl.stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (tls, ctl) = (tls.clone(), ctl.clone());
        tokio::spawn(async move {
            // A client that does not finish its handshake in time is dropped.
            let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await else {
                return;
            };
            let stop = ctl.stop.clone();
            let svc = hyper::service::service_fn(move |req| dispatch(ctl.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

/// Ends the leases of silent workers, once a second.
async fn reap(ctl: Arc<Ctl>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = ctl.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let lost = lock(&ctl.queue).expire(ctl.timeout);
        for (worker, task) in &lost {
            tracing::warn!(worker, task, "a worker went silent; its task goes back to the queue");
        }
        if !lost.is_empty() {
            ctl.wake.notify_waiters();
        }
    }
}

fn reply(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

fn refusal(status: StatusCode, message: &str) -> Response<Body> {
    reply(status, serde_json::json!({ "error": message }).to_string())
}

async fn dispatch(ctl: Arc<Ctl>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    if path == "/v2" || path.starts_with("/v2/") {
        return Ok(registry(&ctl, req.method(), &path).await);
    }
    let presented = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let allowed = match &*lock(&ctl.scope) {
        None => return Ok(refusal(StatusCode::GONE, "the controller serves no run now")),
        Some((_, token)) => presented.as_deref().is_some_and(|p| token.accepts(p)),
    };
    if !allowed {
        return Ok(refusal(
            StatusCode::UNAUTHORIZED,
            "the worker token is not this run's: take COHORT_WORKER_TOKEN from the run's worker-token file",
        ));
    }
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let response = match (req.method(), parts.as_slice()) {
        (&Method::POST, ["v1", "lease"]) => lease(&ctl, req).await,
        (&Method::POST, ["v1", "tunnel"]) => tunnel(&ctl, req),
        (&Method::POST, ["v1", "leases", id, what]) => {
            let id = id.to_string();
            match *what {
                "output" => output(&ctl, &id, req).await,
                "heartbeat" => heartbeat(&ctl, &id),
                "result" => result(&ctl, &id, req).await,
                _ => refusal(StatusCode::NOT_FOUND, "no such route"),
            }
        }
        _ => refusal(StatusCode::NOT_FOUND, "no such route"),
    };
    Ok(response)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    cap: usize,
) -> Result<(T, usize), Response<Body>> {
    let body = Limited::new(req.into_body(), cap)
        .collect()
        .await
        .map_err(|e| refusal(StatusCode::PAYLOAD_TOO_LARGE, &format!("cannot read the request: {e}")))?
        .to_bytes();
    let parsed = serde_json::from_slice(&body)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, &format!("not a valid request: {e}")))?;
    Ok((parsed, body.len()))
}

async fn lease(ctl: &Arc<Ctl>, req: Request<Incoming>) -> Response<Body> {
    let _polling = Polling::new(&ctl.polling);
    let (ask, _) = match read_json::<LeaseRequest>(req, 1 << 20).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    tracing::debug!(
        worker = ask.worker,
        fresh = ask.slot.tree.is_none(),
        "a worker asks for work"
    );
    let deadline = tokio::time::Instant::now() + LONG_POLL;
    loop {
        let woken = ctl.wake.notified();
        if lock(&ctl.scope).is_none() {
            return refusal(StatusCode::GONE, "the run is over");
        }
        let taken = lock(&ctl.queue).take();
        if let Some(t) = taken {
            let (repo, slot, tree) = (ctl.repo.clone(), ask.slot.clone(), t.tree);
            let made =
                tokio::task::spawn_blocking(move || trees::changes_for(&crate::git::thread_local(&repo), &slot, tree))
                    .await;
            let (changes, reset) = match made {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    lock(&ctl.queue).fail(t.id, format!("cannot make the job's files for a worker: {e:#}"));
                    continue;
                }
                Err(e) => {
                    lock(&ctl.queue).untake(t.id);
                    return refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string());
                }
            };
            let mut job = t.job;
            fit(&mut job, &t.workdir, &ask.checkout_path);
            if let Some(scratch) = &t.scratch {
                fit(&mut job, scratch, &ask.scratch_path);
            }
            (job.changes, job.reset, job.tree) = (changes, reset, tree.to_string());
            let Some(id) = lock(&ctl.queue).lease(t.id, &ask.worker, 0) else {
                continue; // cancelled meanwhile
            };
            job.lease = id.clone();
            let body = match serde_json::to_vec(&job) {
                Ok(b) => b,
                Err(e) => return refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
            };
            lock(&ctl.queue).sent(&id, body.len());
            return reply(StatusCode::OK, body);
        }
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep_until(deadline) => return reply(StatusCode::NO_CONTENT, ""),
            _ = ctl.stop.cancelled() => return refusal(StatusCode::GONE, "the controller is stopping"),
        }
    }
}

/// Rewrites the controller's paths in the job's command line to the worker's.
fn fit(job: &mut super::protocol::Job, from: &str, to: &str) {
    let from = from.trim_end_matches('/');
    let to = to.trim_end_matches('/');
    let swap = |s: &mut String| {
        if s == from {
            *s = to.to_string();
        } else if s.contains(&format!("{from}/")) {
            *s = s.replace(&format!("{from}/"), &format!("{to}/"));
        }
    };
    swap(&mut job.program);
    job.args.iter_mut().for_each(swap);
    job.env.iter_mut().for_each(|(_, v)| swap(v));
}

const LEASE_LOST: &str = "this lease is not held: the job went back to the queue, was cancelled, or has its result";

async fn output(ctl: &Arc<Ctl>, id: &str, req: Request<Incoming>) -> Response<Body> {
    let (batch, _) = match read_json::<OutputBatch>(req, 16 << 20).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    let Some(tx) = lock(&ctl.queue).touch(id) else {
        return refusal(StatusCode::CONFLICT, LEASE_LOST);
    };
    for line in batch.lines {
        let _ = tx.send(if line.err {
            Output::Stderr(line.text)
        } else {
            Output::Stdout(line.text)
        });
    }
    reply(StatusCode::OK, "{}")
}

fn heartbeat(ctl: &Arc<Ctl>, id: &str) -> Response<Body> {
    match lock(&ctl.queue).touch(id) {
        Some(_) => reply(StatusCode::OK, "{}"),
        None => refusal(StatusCode::CONFLICT, LEASE_LOST),
    }
}

async fn result(ctl: &Arc<Ctl>, id: &str, req: Request<Incoming>) -> Response<Body> {
    let (result, size) = match read_json::<JobResult>(req, MAX_BODY_BYTES).await {
        Ok(v) => v,
        Err(r) => return r,
    };
    if result.changes.len() + result.scratch.len() > MAX_RESULT_ENTRIES {
        return refusal(StatusCode::PAYLOAD_TOO_LARGE, "too many entries in one result");
    }
    if let Some(bad) = result
        .changes
        .iter()
        .chain(&result.scratch)
        .find_map(|e| check_path(&e.path).err())
    {
        return refusal(StatusCode::BAD_REQUEST, &bad);
    }
    match lock(&ctl.queue).finish(id, result, size) {
        true => reply(StatusCode::OK, "{}"),
        false => refusal(StatusCode::CONFLICT, LEASE_LOST),
    }
}

/// Upgrades the connection and carries its bytes to the gateway's socket, unread: the
/// gateway checks the agent's own task token on every request.
fn tunnel(ctl: &Arc<Ctl>, req: Request<Incoming>) -> Response<Body> {
    let Some(socket) = lock(&ctl.gateway).clone() else {
        return refusal(StatusCode::SERVICE_UNAVAILABLE, "this run has no model gateway");
    };
    tokio::spawn(async move {
        let Ok(upgraded) = hyper::upgrade::on(req).await else {
            return;
        };
        let mut client = TokioIo::new(upgraded);
        if let Ok(mut gw) = tokio::net::UnixStream::connect(&socket).await {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut gw).await;
        }
    });
    let mut r = reply(StatusCode::SWITCHING_PROTOCOLS, "");
    r.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(super::TUNNEL),
    );
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    r
}

async fn registry(ctl: &Arc<Ctl>, method: &Method, path: &str) -> Response<Body> {
    let Some(registry) = lock(&ctl.registry).clone() else {
        return refusal(StatusCode::NOT_FOUND, "this controller serves no image");
    };
    let (method, path) = (method.clone(), path.to_string());
    tokio::task::spawn_blocking(move || registry.respond(&method, &path))
        .await
        .unwrap_or_else(|e| refusal(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()))
}
