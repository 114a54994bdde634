//! Forwarding `/v1/...` to the real endpoint: the task's token is checked and
//! replaced by the key, and the answer streams back through a meter that
//! counts its token usage (`pump`), as it arrives (`Coalesced`).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream, StreamExt};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Request, Response, StatusCode};
use tokio::sync::mpsc;

use super::h1;
use super::server::{api_error, Body, BoxError};
use super::sse::UsageReader;
use super::{BudgetScope, GatewayError, GatewayEvent, Shared, TaskKey, Usage};
use crate::secret::Secret;

/// A request body larger than this is refused (codex sends whole
/// conversations, a few MB at most).
const MAX_REQUEST: usize = 64 << 20;

/// The real endpoint and the clients that talk to it.
pub(crate) struct Upstream {
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    base: String,
    key: Secret,
    /// For a plain-HTTP endpoint reached without a proxy (see `h1`).
    direct: Option<h1::Endpoint>,
    /// For the others: HTTPS, or a proxy from the environment.
    client: reqwest::Client,
}

impl Upstream {
    pub(crate) fn new(base: &str, key: Secret) -> Result<Upstream, GatewayError> {
        let bad = |reason: &str| GatewayError::Upstream {
            url: base.to_string(),
            reason: reason.to_string(),
        };
        let url = reqwest::Url::parse(base).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("the scheme must be http or https"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad("credentials do not belong in the URL"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(bad("a base URL has no query or fragment"));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(Duration::from_secs(60));
        let host = url.host_str().unwrap_or("");
        let local = matches!(host, "127.0.0.1" | "localhost" | "[::1]" | "::1");
        if local {
            builder = builder.no_proxy(); // a proxy from the environment must not capture a local server
        }
        let client = builder.build().map_err(|e| GatewayError::Client(e.to_string()))?;
        // What reqwest would send through a proxy stays with reqwest.
        let proxied = !local
            && ["http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"]
                .iter()
                .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
        let direct = if proxied { None } else { h1::Endpoint::new(&url) };
        Ok(Upstream {
            base: base.trim_end_matches('/').to_string(),
            key,
            direct,
            client,
        })
    }

    /// Closes kept-alive connections (the gateway is stopping).
    pub(crate) fn close_idle(&self) {
        if let Some(direct) = &self.direct {
            direct.close_idle();
        }
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// Headers that describe one connection, not the request, plus the ones the
/// gateway sets itself. `accept-encoding` goes so answers come uncompressed
/// and their usage can be read.
fn strip(headers: &mut HeaderMap, also: &[HeaderName]) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
    for name in also {
        headers.remove(name);
    }
}

pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, &[]);
}

/// `/v1/<rest>` as `/<rest>`; `None` for dot segments, which would let a
/// request climb out of the endpoint's base path with the key on it.
fn rest_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v1")?;
    let dots = rest.split('/').any(|seg| {
        let s = seg.to_ascii_lowercase().replace("%2e", ".");
        s == "." || s == ".."
    });
    (!dots && (rest.is_empty() || rest.starts_with('/'))).then_some(rest)
}

pub(crate) async fn forward(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let Some(task) = bearer(req.headers())
        .and_then(|t| shared.task_for(t))
        .map(|(task, _)| task)
    else {
        return api_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "cohort: this request carries no valid task token (Authorization: Bearer <token>); \
             a token ends with its task",
        );
    };
    let (parts, body) = req.into_parts();
    let Some(rest) = rest_of(parts.uri.path()) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_path",
            "cohort: the path has dot segments",
        );
    };
    let up = &shared.upstream;
    let mut url = format!("{}{rest}", up.base);
    if let Some(q) = parts.uri.query() {
        url.push('?');
        url.push_str(q);
    }
    let Ok(url) = reqwest::Url::parse(&url) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_path",
            "cohort: the path does not make a valid URL",
        );
    };
    let body = match Limited::new(body, MAX_REQUEST).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let too_big = e.is::<http_body_util::LengthLimitError>();
            let (status, message) = if too_big {
                (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "cohort: the request body is too large".to_string(),
                )
            } else {
                (
                    StatusCode::BAD_REQUEST,
                    format!("cohort: reading the request body: {e}"),
                )
            };
            return api_error(status, "invalid_request_error", "invalid_body", &message);
        }
    };
    // Checked (and the request counted) only for a request that will be sent.
    if let Err((scope, budget, spent)) = shared.admit(&task) {
        let whose = match scope {
            BudgetScope::Task => "this task's",
            BudgetScope::Run => "this run's",
        };
        let message = format!("cohort: {whose} budget of {budget} is spent ({spent} used); stop here");
        tracing::info!(%task, %scope, "refused a model request: {message}");
        return api_error(
            StatusCode::TOO_MANY_REQUESTS,
            "insufficient_quota",
            "cohort_budget",
            &message,
        );
    }
    let mut headers = parts.headers;
    strip(
        &mut headers,
        &[
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::ACCEPT_ENCODING,
        ],
    );
    let (status, mut headers, source) = match &up.direct {
        Some(endpoint) => {
            let mut target = url.path().to_string();
            if let Some(q) = url.query() {
                target.push('?');
                target.push_str(q);
            }
            // The one place the key goes on this path; `h1::Error` never quotes the request.
            match endpoint
                .send(&parts.method, &target, &headers, up.key.expose(), &body)
                .await
            {
                Ok(a) => (a.status, a.headers, Source::Direct(a.body)),
                Err(e) => {
                    let why = format!("error sending request for url ({url}): {e}");
                    return unreachable(shared, &task, &why);
                }
            }
        }
        None => {
            let sent = up
                .client
                .request(parts.method.clone(), url)
                .headers(headers)
                .bearer_auth(up.key.expose()) // the one place the key goes: marked sensitive by reqwest
                .body(body)
                .send()
                .await;
            match sent {
                Ok(a) => (a.status(), a.headers().clone(), Source::Reqwest(a)),
                Err(e) => return unreachable(shared, &task, &chain(&e)),
            }
        }
    };
    tracing::debug!(%task, method = %parts.method, path = parts.uri.path(), %status, "forwarded");
    if status == StatusCode::UNAUTHORIZED {
        // The endpoint's message may quote part of the key; the agent gets ours.
        tracing::warn!("the model endpoint refused cohort's API key (HTTP 401)");
        answered_without_usage(shared, &task);
        return api_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "upstream_key_refused",
            "cohort: the model endpoint refused cohort's API key (HTTP 401)",
        );
    }
    strip_hop_by_hop(&mut headers);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let remaining = match &source {
        Source::Reqwest(a) => a.content_length(),
        Source::Direct(_) => None, // its reader knows where the body ends
    };
    let meter = Meter {
        reader: UsageReader::for_content_type(&content_type),
        remaining,
        answer: Usage {
            requests: 1,
            ..Usage::default()
        },
        shared: shared.clone(),
        task,
        done: false,
    };
    let body = match source {
        Source::Direct(reader) => Body::new(Relay {
            reader,
            meter,
            out: BytesMut::new(),
            failed: None,
            ended: false,
        }),
        Source::Reqwest(answer) => {
            let (tx, rx) = mpsc::channel(QUEUED_CHUNKS);
            shared.tasks.spawn(pump(Box::pin(answer.bytes_stream()), meter, tx));
            Body::new(Coalesced { rx, failed: None })
        }
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Where an answer's body comes from.
enum Source {
    Direct(h1::Reader),
    Reqwest(reqwest::Response),
}

/// The endpoint gave no answer: 502, and the request counted without usage.
fn unreachable(shared: &Shared, task: &TaskKey, why: &str) -> Response<Body> {
    answered_without_usage(shared, task);
    tracing::warn!(%task, "the model endpoint cannot be reached: {why}");
    api_error(
        StatusCode::BAD_GATEWAY,
        "server_error",
        "upstream_unreachable",
        &format!("cohort: the model endpoint cannot be reached: {why}"),
    )
}
/// The usage event of a request that was sent but whose answer is not passed on.
fn answered_without_usage(shared: &Shared, task: &TaskKey) {
    shared.emit(GatewayEvent::Usage {
        task: task.clone(),
        answer: Usage {
            requests: 1,
            ..Usage::default()
        },
        total: shared.task_total(task),
    });
}

/// An error and its causes, one line (reqwest's own text names no cause).
/// The URL in it is the endpoint's, which holds no key.
fn chain(e: &reqwest::Error) -> String {
    let mut out = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;
type Chunk = Result<Bytes, BoxError>;

/// Chunks read from the endpoint and not yet taken by the agent's connection.
const QUEUED_CHUNKS: usize = 64;
/// At most this many queued bytes go to the agent in one piece.
const MAX_FRAME: usize = 256 << 10;

/// Counts an answer's usage as its bytes pass.
struct Meter {
    reader: UsageReader,
    /// Bytes still to come when the length is known: the end is seen at the last byte.
    remaining: Option<u64>,
    answer: Usage,
    shared: Arc<Shared>,
    task: TaskKey,
    done: bool,
}

impl Meter {
    fn feed(&mut self, chunk: &[u8]) {
        let found = self.reader.feed(chunk);
        self.count(found);
        if let Some(left) = self.remaining.as_mut() {
            *left = left.saturating_sub(chunk.len() as u64);
            if *left == 0 {
                self.finish();
            }
        }
    }

    /// Every byte of a body of known length has passed.
    fn complete(&self) -> bool {
        self.remaining == Some(0)
    }

    fn count(&mut self, usage: Option<Usage>) {
        if let Some(u) = usage {
            self.answer.add(&u);
            self.shared.add_usage(&self.task, &u);
        }
    }

    /// The answer ended or was cut short: count what is left, report it.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let last = self.reader.finish();
        self.count(last);
        self.shared.emit(GatewayEvent::Usage {
            task: self.task.clone(),
            answer: self.answer,
            total: self.shared.task_total(&self.task),
        });
    }
}

impl Drop for Meter {
    /// An answer whose reader went away (the agent hung up) still counts.
    fn drop(&mut self) {
        self.finish();
    }
}

/// At most this many bytes go to the agent in one frame from `Relay`
/// (hyper writes several frames with one call).
const FRAME: usize = 64 << 10;

/// The answer's body read straight from the endpoint's connection (`h1`),
/// in the agent's connection task: each poll passes on all that has arrived
/// (up to `FRAME` bytes) as one frame, counted before it is passed on, so
/// the agent cannot see the end of an answer before its tokens are on the
/// task's account.
struct Relay {
    reader: h1::Reader,
    meter: Meter,
    /// The next frame is built here (its spare room is reused once a frame
    /// sent is dropped).
    out: BytesMut,
    /// An error met after bytes that go first.
    failed: Option<h1::Error>,
    ended: bool,
}

impl hyper::body::Body for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(e) = this.failed.take() {
            this.ended = true;
            return Poll::Ready(Some(Err(Box::new(e))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if this.out.capacity() < FRAME / 4 {
            this.out.reserve(FRAME);
        }
        let limit = this.out.capacity();
        let read = this.reader.poll_read(cx, &mut this.out, limit);
        if !this.out.is_empty() {
            this.meter.feed(&this.out);
        }
        match read {
            Ok(h1::Read::Pending) => return Poll::Pending,
            Ok(h1::Read::More | h1::Read::End) => {}
            Err(e) => {
                this.meter.finish();
                if this.out.is_empty() {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
                this.failed = Some(e);
            }
        }
        if this.reader.is_done() {
            this.meter.finish();
            this.ended = true;
            if let (Some(conn), Some(direct)) = (this.reader.reusable(), &this.meter.shared.upstream.direct) {
                direct.release(conn);
            }
        }
        if this.out.is_empty() {
            this.ended = true;
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.out.split().freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.failed.is_none()
    }
}

/// Reads the answer from the endpoint, counts it, and queues it for the
/// agent's connection. Each chunk is counted before it is queued, so the agent
/// cannot see the end of an answer before its tokens are on the task's
/// account (the next request's budget check sees them).
///
/// The endpoint's client hands over one chunk (one SSE event) per turn of its
/// connection task. The pump takes every chunk that is already read before it
/// queues them as one piece, so a fast stream costs one write to the agent per
/// batch, not one per event; a slow one passes each event on at once.
async fn pump(mut inner: ByteStream, mut meter: Meter, tx: mpsc::Sender<Chunk>) {
    loop {
        let next = tokio::select! {
            next = inner.next() => next,
            // The agent went away (or the gateway stopped): stop reading.
            _ = tx.closed() => break,
        };
        let chunk = match next {
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => {
                meter.finish();
                let _ = tx.send(Err(Box::new(e))).await;
                break;
            }
            None => break,
        };
        meter.feed(&chunk);
        // Take what the endpoint's connection has read already (it hands over
        // one chunk per turn) before the agent's side is woken: one write to
        // the agent for many events. Nothing waits for data not yet there.
        let mut joined: Option<BytesMut> = None;
        let mut ended = None;
        while joined.as_ref().map_or(chunk.len(), BytesMut::len) < MAX_FRAME {
            if meter.complete() {
                // The whole length is here: no turn to wait for.
                ended = Some(None);
                break;
            }
            YieldOnce(false).await;
            match inner.next().now_or_never() {
                Some(Some(Ok(more))) => {
                    meter.feed(&more);
                    joined
                        .get_or_insert_with(|| BytesMut::from(&chunk[..]))
                        .extend_from_slice(&more);
                }
                Some(Some(Err(e))) => {
                    ended = Some(Some(e));
                    break;
                }
                Some(None) => {
                    ended = Some(None);
                    break;
                }
                None => break,
            }
        }
        let data = joined.map_or(chunk, BytesMut::freeze);
        if tx.send(Ok(data)).await.is_err() {
            break;
        }
        match ended {
            Some(Some(e)) => {
                meter.finish();
                let _ = tx.send(Err(Box::new(e))).await;
                break;
            }
            Some(None) => break,
            None => {}
        }
    }
    meter.finish();
}

/// Lets the tasks that are ready run once (the endpoint's connection among
/// them) before going on. Unlike `tokio::task::yield_now`, which also makes the
/// runtime poll its I/O driver (an `epoll_wait` per SSE event), this only goes
/// to the back of the queue; the driver is still polled every few dozen turns.
struct YieldOnce(bool);

impl std::future::Future for YieldOnce {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if std::mem::replace(&mut self.0, true) {
            return Poll::Ready(());
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// The answer's body on its way to the agent: what the pump queued, passed on
/// as soon as it is there, the chunks queued meanwhile joined into one frame.
struct Coalesced {
    rx: mpsc::Receiver<Chunk>,
    /// An error seen while joining, for the next poll.
    failed: Option<BoxError>,
}

impl hyper::body::Body for Coalesced {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Some(Err(e)));
        }
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => chunk,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let mut joined: Option<BytesMut> = None;
        while joined.as_ref().map_or(first.len(), BytesMut::len) < MAX_FRAME {
            match self.rx.try_recv() {
                Ok(Ok(more)) => joined
                    .get_or_insert_with(|| BytesMut::from(&first[..]))
                    .extend_from_slice(&more),
                Ok(Err(e)) => {
                    self.failed = Some(e);
                    break;
                }
                // Empty, or the end, which the next poll reports.
                Err(_) => break,
            }
        }
        let data = joined.map_or(first, BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_under_the_base() {
        assert_eq!(rest_of("/v1/responses"), Some("/responses"));
        assert_eq!(rest_of("/v1"), Some(""));
        assert_eq!(rest_of("/v1/../admin"), None);
        assert_eq!(rest_of("/v1/%2E%2e/admin"), None);
        assert_eq!(rest_of("/v1/./x"), None);
        assert_eq!(rest_of("/v10/x"), None);
    }

    #[test]
    fn bearer_tokens_and_stripped_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer abc ".parse().unwrap());
        assert_eq!(bearer(&h), Some("abc"));
        h.insert(header::AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        h.insert(header::ACCEPT_ENCODING, "gzip".parse().unwrap());
        strip(&mut h, &[header::AUTHORIZATION, header::ACCEPT_ENCODING]);
        let left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(left, vec!["x-kept"]);
    }
}
