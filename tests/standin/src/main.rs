//! cohort-standin: a local stand-in for the OpenAI API, for tests.
//!
//! It speaks the real wire protocols over real HTTP: `POST /v1/responses` as
//! Server-Sent Events for the Codex CLI, `POST /v1/chat/completions` for the
//! planner, `GET /v1/models`. Behaviour is scripted (see `modes.rs`) and every
//! request is recorded to a JSONL file so tests can assert what clients sent.
//!
//! Start-up contract: it binds 127.0.0.1 (port 0 = ephemeral unless `--port`),
//! prints `127.0.0.1:PORT` as the first line of stdout and, with `--port-file`,
//! writes the same text to that file atomically (write + rename).

mod chat;
mod modes;
mod responses;

use std::convert::Infallible;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::{json, Value};

use modes::{Mode, Selector};

pub type Body = BoxBody<Bytes, Infallible>;

const USAGE: &str = "\
usage: cohort-standin [options]
  --port N             port to bind on 127.0.0.1 (default 0: ephemeral)
  --port-file FILE     also write `127.0.0.1:PORT` to FILE (atomically)
  --record FILE        append every request as one JSON line to FILE
  --mode MODE          normal|fail|slow|malformed|malformed-body|429|500|invalid-plan
                       (env STANDIN_MODE; default normal)
  --times N            apply --mode to the first N POSTs only (default: all)
  --delay-ms MS        delay for `slow` (default 3000)
  --retry-after SECS   Retry-After value for 429 (default 1)
  --models a,b,...     models to list; when given, other models get 404
  --watch-stdin        exit when stdin reaches EOF (parent died)
  --max-seconds N      exit after N seconds whatever happens
Per-request override: a `STANDIN:<mode>[=<n>]` marker in the request text.
Edit command override: `STANDIN-CMD: <shell command>` lines in the prompt, or
`STANDIN-SCRIPT:` followed by a multi-line script up to `STANDIN-END`.";

pub struct Config {
    pub port: u16,
    pub port_file: Option<String>,
    pub record: Option<String>,
    pub retry_after: u64,
    pub models: Option<Vec<String>>,
    pub watch_stdin: bool,
    pub max_seconds: Option<u64>,
}

pub struct State {
    pub cfg: Config,
    pub selector: Selector,
    record: Option<Mutex<std::fs::File>>,
    seq: AtomicU64,
}

fn parse_args() -> Result<(Config, Selector), String> {
    let mut cfg = Config {
        port: 0,
        port_file: None,
        record: None,
        retry_after: 1,
        models: None,
        watch_stdin: false,
        max_seconds: None,
    };
    let mut mode = match std::env::var("STANDIN_MODE") {
        Ok(m) if !m.is_empty() => Mode::parse(&m).ok_or(format!("unknown STANDIN_MODE {m}"))?,
        _ => Mode::Normal,
    };
    let mut times = None;
    let mut delay = Duration::from_millis(3000);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or(format!("{a} needs a value"));
        let num = |v: String| v.parse::<u64>().map_err(|_| format!("not a number: {v}"));
        match a.as_str() {
            "--port" => cfg.port = num(val()?)? as u16,
            "--port-file" => cfg.port_file = Some(val()?),
            "--record" => cfg.record = Some(val()?),
            "--mode" => {
                let v = val()?;
                mode = Mode::parse(&v).ok_or(format!("unknown mode {v}"))?
            }
            "--times" => times = Some(num(val()?)?),
            "--delay-ms" => delay = Duration::from_millis(num(val()?)?),
            "--retry-after" => cfg.retry_after = num(val()?)?,
            "--models" => {
                cfg.models = Some(val()?.split(',').map(|s| s.trim().to_string()).collect())
            }
            "--watch-stdin" => cfg.watch_stdin = true,
            "--max-seconds" => cfg.max_seconds = Some(num(val()?)?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok((cfg, Selector::new(mode, times, delay)))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let (cfg, selector) = match parse_args() {
        Ok(x) => x,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, cfg.port)))
        .await
        .unwrap_or_else(|e| fail(format!("cannot bind: {e}")));
    let addr = listener.local_addr().unwrap();
    let record = cfg.record.as_ref().map(|p| {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p);
        Mutex::new(f.unwrap_or_else(|e| fail(format!("cannot open {p}: {e}"))))
    });
    if let Some(pf) = &cfg.port_file {
        // Rename makes the file appear complete or not at all.
        let tmp = format!("{pf}.tmp{}", std::process::id());
        std::fs::write(&tmp, format!("{addr}\n")).unwrap_or_else(|e| fail(format!("{tmp}: {e}")));
        std::fs::rename(&tmp, pf).unwrap_or_else(|e| fail(format!("{pf}: {e}")));
    }
    println!("{addr}");
    let _ = std::io::stdout().flush();

    if cfg.watch_stdin {
        tokio::spawn(async {
            use tokio::io::AsyncReadExt;
            let mut buf = [0u8; 256];
            let mut stdin = tokio::io::stdin();
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            std::process::exit(0);
        });
    }
    if let Some(secs) = cfg.max_seconds {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            std::process::exit(0);
        });
    }

    let state = Arc::new(State {
        cfg,
        selector,
        record,
        seq: AtomicU64::new(0),
    });
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let st = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await
            {
                eprintln!("connection: {e}");
            }
        });
    }
}

fn fail(msg: String) -> ! {
    eprintln!("cohort-standin: {msg}");
    std::process::exit(2)
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
    if let Some(rec) = &st.record {
        let line = json!({
            "seq": seq,
            "method": method,
            "path": path,
            "headers": headers,
            "body": body.clone().unwrap_or_else(|| Value::String(String::from_utf8_lossy(&bytes).into_owned())),
            "status": outcome.response.status().as_u16(),
            "mode": outcome.mode,
            "usage": outcome.usage,
        });
        let mut f = rec.lock().unwrap();
        let _ = writeln!(f, "{line}");
        let _ = f.flush();
    }
    Ok(outcome.response)
}

async fn route(st: &State, method: &str, path: &str, body: Option<&Value>) -> Outcome {
    if method == "GET" && path.ends_with("/models") {
        let ids = st.cfg.models.clone().unwrap_or_else(|| {
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
    if let Some(models) = &st.cfg.models {
        if !models.iter().any(|m| m == model) {
            let msg =
                format!("The model `{model}` does not exist or you do not have access to it.");
            return plain(error_response(
                StatusCode::NOT_FOUND,
                "model_not_found",
                &msg,
            ));
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
            r.headers_mut().insert(
                "retry-after",
                st.cfg.retry_after.to_string().parse().unwrap(),
            );
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

pub fn raw_response(
    status: StatusCode,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Response<Body> {
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
