//! cohort-standin: a local stand-in for the OpenAI API, for tests.
//!
//! It speaks the real wire protocols over real HTTP: `POST /v1/responses` as
//! Server-Sent Events for the Codex CLI, `POST /v1/chat/completions` for the
//! planner, `GET /v1/models`. Behaviour is scripted (see `modes.rs`) and every
//! request is recorded (in memory and, optionally, to a JSONL file) so tests
//! can assert what clients sent.
//!
//! Two ways to use it: the `cohort-standin` binary (see `main.rs`, for shell
//! scripts and for codex runs from other processes), or in-process from Rust
//! tests with [`Standin::start`], which serves on a real loopback socket from
//! a background thread and stops when dropped.

mod chat;
pub mod modes;
mod responses;

use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

pub use modes::Mode;
use modes::Selector;
pub use responses::{edit_command, prompts, slug, usage_final, usage_tool_call};

pub type Body = BoxBody<Bytes, Infallible>;

/// Everything that shapes the stand-in's answers.
#[derive(Clone, Debug)]
pub struct Options {
    /// 0: an ephemeral port.
    pub port: u16,
    /// The address to listen on; default 127.0.0.1 (the VM test also needs one that
    /// containers in their own network namespace can reach).
    pub host: Option<Ipv4Addr>,
    /// The process-wide behaviour (per-request markers override it).
    pub mode: Mode,
    /// Apply `mode` to the first `times` POSTs only (None: to all).
    pub times: Option<u64>,
    /// Delay for `slow`.
    pub delay: Duration,
    /// `Retry-After` seconds sent with 429.
    pub retry_after: u64,
    /// Models to list; when set, requests for other models get 404.
    pub models: Option<Vec<String>>,
    /// Append every request as one JSON line to this file.
    pub record: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            port: 0,
            host: None,
            mode: Mode::Normal,
            times: None,
            delay: Duration::from_millis(3000),
            retry_after: 1,
            models: None,
            record: None,
        }
    }
}

pub struct State {
    opts: Options,
    selector: Selector,
    file: Option<Mutex<std::fs::File>>,
    records: Arc<Mutex<Vec<Value>>>,
    seq: AtomicU64,
}

impl State {
    pub fn new(opts: Options) -> std::io::Result<State> {
        let file = match &opts.record {
            Some(p) => Some(Mutex::new(
                std::fs::OpenOptions::new().create(true).append(true).open(p)?,
            )),
            None => None,
        };
        Ok(State {
            selector: Selector::new(opts.mode, opts.times, opts.delay),
            opts,
            file,
            records: Arc::new(Mutex::new(Vec::new())),
            seq: AtomicU64::new(0),
        })
    }
}

/// Binds `opts.host` (default 127.0.0.1) on `opts.port`.
pub async fn bind(opts: &Options) -> std::io::Result<tokio::net::TcpListener> {
    let host = opts.host.unwrap_or(Ipv4Addr::LOCALHOST);
    tokio::net::TcpListener::bind(SocketAddr::from((host, opts.port))).await
}

/// Serves connections on `listener` until the future is dropped.
pub async fn serve(listener: tokio::net::TcpListener, state: Arc<State>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("cohort-standin: accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // As a real endpoint does: a streamed answer's small writes go out at once, rather than
        // waiting for the client's delayed ACK (Nagle's algorithm).
        let _ = stream.set_nodelay(true);
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            // Errors here are clients hanging up mid-stream, which tests do on purpose.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// A stand-in serving from a background thread, for Rust tests. Stops on drop.
pub struct Standin {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<Value>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Standin {
    /// Binds, then serves from a new thread with its own runtime, so it
    /// works from sync tests and from inside another tokio runtime alike.
    pub fn start(opts: Options) -> std::io::Result<Standin> {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, opts.port))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State::new(opts)?);
        let records = state.records.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("cohort-standin".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the stand-in");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener).expect("register the listener");
                    tokio::select! {
                        _ = serve(listener, state) => {}
                        _ = stopped => {}
                    }
                })
            })?;
        Ok(Standin {
            addr,
            records,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, what clients take as their base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request so far, in arrival order (see `record_line` for the shape).
    pub fn records(&self) -> Vec<Value> {
        self.records.lock().unwrap().clone()
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a handler decided, for the record line.
pub struct Outcome {
    pub response: Response<Body>,
    pub mode: &'static str,
    /// Usage the stand-in reported, if any (tests sum these).
    pub usage: Option<Value>,
}

async fn handle(st: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let seq = st.seq.fetch_add(1, Ordering::SeqCst) + 1;
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
        match headers.get_mut(name.as_str()) {
            Some(Value::String(prev)) => *prev = format!("{prev}, {v}"),
            _ => {
                headers.insert(name.as_str().to_string(), Value::String(v));
            }
        }
    }
    let bytes = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let body: Option<Value> = serde_json::from_slice(&bytes).ok();

    let outcome = route(&st, &method, &path, body.as_ref()).await;
    let line = record_line(seq, &method, &path, headers, body, &bytes, &outcome);
    if let Some(f) = &st.file {
        let mut f = f.lock().unwrap();
        let _ = writeln!(f, "{line}");
        let _ = f.flush();
    }
    st.records.lock().unwrap().push(line);
    Ok(outcome.response)
}

/// One recorded request: `{seq, method, path, headers: {lowercase name: value},
/// body: JSON (or the raw text when not JSON), status, mode, usage}`.
fn record_line(
    seq: u64,
    method: &str,
    path: &str,
    headers: serde_json::Map<String, Value>,
    body: Option<Value>,
    bytes: &[u8],
    outcome: &Outcome,
) -> Value {
    json!({
        "seq": seq,
        "method": method,
        "path": path,
        "headers": headers,
        "body": body.unwrap_or_else(|| Value::String(String::from_utf8_lossy(bytes).into_owned())),
        "status": outcome.response.status().as_u16(),
        "mode": outcome.mode,
        "usage": outcome.usage,
    })
}

async fn route(st: &State, method: &str, path: &str, body: Option<&Value>) -> Outcome {
    if method == "GET" && path.ends_with("/models") {
        let ids = st.opts.models.clone().unwrap_or_else(|| {
            ["gpt-5-codex", "gpt-5-nano", "gpt-5-mini"]
                .iter()
                .map(|s| s.to_string())
                .collect()
        });
        let data: Vec<Value> = ids
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "standin"}))
            .collect();
        // `data` is the OpenAI shape; `models` is what codex reads (empty: use its defaults).
        return plain(json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": data, "models": []}),
        ));
    }
    if method != "POST" || !(path.ends_with("/responses") || path.ends_with("/chat/completions")) {
        return plain(error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("no route {method} {path}"),
        ));
    }
    let Some(body) = body else {
        return plain(error_response(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body is not JSON",
        ));
    };
    let model = body.get("model").and_then(Value::as_str).unwrap_or("");
    if model.is_empty() {
        return plain(error_response(
            StatusCode::BAD_REQUEST,
            "missing_model",
            "the request has no model",
        ));
    }
    if let Some(models) = &st.opts.models {
        if !models.iter().any(|m| m == model) {
            let msg = format!("The model `{model}` does not exist or you do not have access to it.");
            return plain(error_response(StatusCode::NOT_FOUND, "model_not_found", &msg));
        }
    }
    let chat = path.ends_with("/chat/completions");
    let texts = if chat {
        chat::texts(body)
    } else {
        responses::texts(body)
    };
    let chosen = st.selector.choose(&texts);
    match chosen.mode {
        Mode::RateLimit => {
            let mut r = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "Rate limit reached (scripted)",
            );
            r.headers_mut()
                .insert("retry-after", st.opts.retry_after.to_string().parse().unwrap());
            return Outcome {
                response: r,
                mode: chosen.mode.name(),
                usage: None,
            };
        }
        Mode::ServerError => {
            let r = error_response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "Internal error (scripted)",
            );
            return Outcome {
                response: r,
                mode: chosen.mode.name(),
                usage: None,
            };
        }
        Mode::MalformedBody => {
            let r = raw_response(
                StatusCode::OK,
                "application/json",
                "{\"id\": \"broken\", \"choices\": [",
            );
            return Outcome {
                response: r,
                mode: chosen.mode.name(),
                usage: None,
            };
        }
        Mode::Slow => tokio::time::sleep(chosen.delay).await,
        _ => {}
    }
    if chat {
        chat::answer(body, chosen).await
    } else {
        responses::answer(body, chosen)
    }
}

fn plain(response: Response<Body>) -> Outcome {
    Outcome {
        response,
        mode: "normal",
        usage: None,
    }
}

pub fn raw_response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

pub fn json_response(status: StatusCode, v: &Value) -> Response<Body> {
    raw_response(status, "application/json", v.to_string())
}

/// The OpenAI error shape: `{"error": {message, type, code}}`.
pub fn error_response(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let kind = if status.is_server_error() {
        "server_error"
    } else {
        "invalid_request_error"
    };
    json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    )
}

/// Every `text` string in an OpenAI content value (a string or an array of parts).
pub fn content_texts(content: &Value, out: &mut Vec<String>) {
    match content {
        Value::String(s) => out.push(s.clone()),
        Value::Array(parts) => {
            for p in parts {
                if let Some(t) = p.get("text").and_then(Value::as_str) {
                    out.push(t.to_string());
                }
            }
        }
        _ => {}
    }
}
