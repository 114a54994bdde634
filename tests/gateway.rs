//! The model gateway against the real stand-in (real HTTP, real SSE), real
//! local servers as egress destinations, the real `cohort __bridge` process
//! and the real codex CLI.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use cohort::gateway::{Budget, BudgetScope, Gateway, GatewayConfig, GatewayEvent, RefusalReason, TaskKey, Usage};
use cohort::secret::Secret;
use cohort_standin::{Options, Standin};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const KEY: &str = "sk-gateway-test-key-7f3a9c1e5b2d4068";

fn task(index: usize) -> TaskKey {
    TaskKey {
        run_id: "run-1".into(),
        index,
        attempt: 1,
    }
}

async fn start(standin: &Standin, configure: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let mut config = GatewayConfig::new(standin.base_url(), Secret::new(KEY));
    configure(&mut config);
    Gateway::start(config).unwrap()
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// A codex-shaped first request (answered with a tool call: 1000 in, 200 cached, 50 out).
fn first_turn(prompt: &str) -> Value {
    json!({"model": "gpt-5-codex", "stream": true, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]}]})
}

/// Its follow-up carrying the tool's output (answered with the final message: 1200, 1000, 25).
fn second_turn(prompt: &str) -> Value {
    json!({"model": "gpt-5-codex", "stream": true, "input": [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": prompt}]},
        {"type": "function_call_output", "call_id": "call_standin_1", "output": "ok"}]})
}

async fn post(gw: &Gateway, path: &str, token: Option<&str>, body: &Value) -> (u16, String) {
    let mut req = client().post(format!("{}{path}", gw.base_url().unwrap())).json(body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap())
}

fn events(rx: &mut tokio::sync::mpsc::UnboundedReceiver<GatewayEvent>) -> Vec<GatewayEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn usage(input: u64, cached_input: u64, output: u64, requests: u64) -> Usage {
    Usage {
        input,
        cached_input,
        output,
        requests,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_key_is_added_by_the_gateway_and_tokens_are_checked() {
    let standin = Standin::start(Options::default()).unwrap();
    let gw = start(&standin, |_| {}).await;
    let token = gw.issue(task(1));
    assert!(!format!("{token:?}").contains(token.expose()));
    assert!(token.expose().len() >= 64 && !token.expose().contains(KEY));

    let (status, body) = post(&gw, "/responses", Some(token.expose()), &first_turn("Task: x")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("response.completed"), "{body}");
    let records = standin.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["headers"]["authorization"], format!("Bearer {KEY}"));
    assert_eq!(records[0]["path"], "/v1/responses");
    assert!(
        !records[0].to_string().contains(token.expose()),
        "the token went upstream"
    );

    // No token, a wrong one, a revoked one: 401 in OpenAI's shape, never forwarded.
    let other = gw.issue(task(2));
    let other_value = other.expose().to_string();
    other.revoke();
    for bad in [None, Some("cohort-0000"), Some(KEY), Some(other_value.as_str())] {
        let (status, body) = post(&gw, "/responses", bad, &first_turn("Task: y")).await;
        assert_eq!(status, 401, "{bad:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key", "{body}");
        assert!(!body.contains(KEY));
    }
    assert_eq!(standin.records().len(), 1, "a refused request reached the stand-in");
    // A token ends with its value dropped too.
    let value = token.expose().to_string();
    drop(token);
    let (status, _) = post(&gw, "/responses", Some(&value), &first_turn("Task: z")).await;
    assert_eq!(status, 401);
    // Only /v1 is served.
    let resp = client()
        .get(format!("http://{}/v2/models", gw.addr().unwrap()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sse_streams_through_as_it_arrives_and_usage_is_counted() {
    let standin = Standin::start(Options::default()).unwrap();
    let gw = start(&standin, |_| {}).await;
    let mut rx = gw.take_events().unwrap();
    let token = gw.issue(task(1));
    // `slow=MS`: a delay before the answer and between its four events.
    let delay = Duration::from_millis(250);
    let resp = client()
        .post(format!("{}/responses", gw.base_url().unwrap()))
        .bearer_auth(token.expose())
        .json(&first_turn("Task: stream STANDIN:slow=250"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut first_at = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        if first_at.is_none() && text.contains("response.created") {
            first_at = Some(Instant::now());
            assert!(
                !text.contains("response.completed"),
                "the first chunk held the whole answer"
            );
        }
    }
    let ended = Instant::now();
    let first_at = first_at.expect("a response.created event");
    assert!(
        ended - first_at >= delay * 2,
        "the first event came {:?} before the end; the stream was buffered",
        ended - first_at
    );
    let kinds: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("event: ")).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.output_item.added",
            "response.output_item.done",
            "response.completed"
        ]
    );
    assert_eq!(gw.usage(&task(1)), usage(1000, 200, 50, 1));

    let (status, _) = post(&gw, "/responses", Some(token.expose()), &second_turn("Task: stream")).await;
    assert_eq!(status, 200);
    // The stand-in's fixed figures: what codex's turn.completed reports for the two requests.
    assert_eq!(gw.usage(&task(1)), usage(2200, 1200, 75, 2));
    assert_eq!(gw.run_usage(), usage(2200, 1200, 75, 2));
    assert_eq!(gw.usage(&task(2)), Usage::default());
    let got = events(&mut rx);
    assert_eq!(
        got,
        vec![
            GatewayEvent::Usage {
                task: task(1),
                answer: usage(1000, 200, 50, 1),
                total: usage(1000, 200, 50, 1)
            },
            GatewayEvent::Usage {
                task: task(1),
                answer: usage(1200, 1000, 25, 1),
                total: usage(2200, 1200, 75, 2)
            },
        ]
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_completions_usage_is_counted_in_json_and_streamed() {
    let standin = Standin::start(Options::default()).unwrap();
    let gw = start(&standin, |_| {}).await;
    let token = gw.issue(task(3));
    let body = json!({"model": "gpt-5-nano", "messages": [{"role": "user", "content": "- one\n- two"}]});
    let (status, text) = post(&gw, "/chat/completions", Some(token.expose()), &body).await;
    assert_eq!(status, 200, "{text}");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (status, text) = post(&gw, "/chat/completions", Some(token.expose()), &streamed).await;
    assert_eq!(status, 200);
    assert!(text.contains("data: [DONE]"), "{text}");
    let n = |r: &Value, k: &str| r["usage"][k].as_u64().unwrap();
    let records = standin.records();
    let input = n(&records[0], "prompt_tokens") + n(&records[1], "prompt_tokens");
    let output = n(&records[0], "completion_tokens") + n(&records[1], "completion_tokens");
    assert!(input > 0 && output > 0);
    assert_eq!(gw.usage(&task(3)), usage(input, 0, output, 2));
    // GET passes too (no usage, one request).
    let resp = client()
        .get(format!("{}/models", gw.base_url().unwrap()))
        .bearer_auth(token.expose())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(gw.usage(&task(3)).requests, 3);
    gw.shutdown().await;
}

fn budget_error(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(v["error"]["code"], "cohort_budget", "{body}");
    v["error"]["message"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_over_its_budget_is_refused_with_429() {
    let standin = Standin::start(Options::default()).unwrap();
    let gw = start(&standin, |c| c.task_budget = Some(Budget::Tokens(1000))).await;
    let mut rx = gw.take_events().unwrap();
    let token = gw.issue(task(1));
    // 1050 tokens: the request that crosses the limit finishes...
    let (status, _) = post(&gw, "/responses", Some(token.expose()), &first_turn("Task: b")).await;
    assert_eq!(status, 200);
    assert!(gw.over_budget(&task(1)));
    assert!(!gw.run_over_budget());
    // ...the next one is refused, and never reaches the endpoint.
    let (status, body) = post(&gw, "/responses", Some(token.expose()), &second_turn("Task: b")).await;
    assert_eq!(status, 429);
    assert_eq!(
        budget_error(&body),
        "cohort: this task's budget of 1000 tokens is spent (1050 tokens used); stop here"
    );
    assert_eq!(standin.records().len(), 1);
    let over: Vec<_> = events(&mut rx)
        .into_iter()
        .filter(|e| matches!(e, GatewayEvent::OverBudget { .. }))
        .collect();
    assert_eq!(
        over,
        vec![GatewayEvent::OverBudget {
            task: task(1),
            scope: BudgetScope::Task,
            budget: Budget::Tokens(1000),
            spent: Budget::Tokens(1050)
        }]
    );
    // Another task has its own budget.
    let other = gw.issue(task(2));
    let (status, _) = post(&gw, "/responses", Some(other.expose()), &first_turn("Task: c")).await;
    assert_eq!(status, 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_over_its_budget_refuses_every_task() {
    let standin = Standin::start(Options::default()).unwrap();
    let price = cohort::config::Price {
        input: 1.0,
        output: 1.0,
        cached_input: None,
    };
    // $0.002 at $1 per million tokens: 2000 tokens.
    let gw = start(&standin, |c| {
        c.run_budget = Some(Budget::Dollars(0.002));
        c.price = Some(price);
    })
    .await;
    let (a, b) = (gw.issue(task(1)), gw.issue(task(2)));
    for t in [&a, &b] {
        let (status, _) = post(&gw, "/responses", Some(t.expose()), &first_turn("Task: r")).await;
        assert_eq!(status, 200);
    }
    assert!(gw.run_over_budget());
    assert!(!gw.over_budget(&task(1)));
    let c = gw.issue(task(3));
    for t in [&a, &c] {
        let (status, body) = post(&gw, "/responses", Some(t.expose()), &first_turn("Task: r")).await;
        assert_eq!(status, 429);
        assert_eq!(
            budget_error(&body),
            "cohort: this run's budget of $0.002 is spent ($0.0021 used); stop here"
        );
    }
    assert_eq!(standin.records().len(), 2);
    assert_eq!(gw.run_usage(), usage(2000, 400, 100, 2));
    gw.shutdown().await;
}

/// A tiny HTTP server that answers every request with `hello from <addr>`.
async fn destination() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = format!("hello from {addr}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

fn basic(token: &str) -> String {
    let b = base64::engine::general_purpose::STANDARD.encode(format!("cohort:{token}"));
    format!("Proxy-Authorization: Basic {b}\r\n")
}

/// Sends a CONNECT and returns the connection and the answer's head.
async fn connect(gateway: SocketAddr, target: &str, auth: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    (s, String::from_utf8(head).unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn egress_goes_only_to_allowed_hosts() {
    let standin = Standin::start(Options::default()).unwrap();
    let dest = destination().await;
    let gw = start(&standin, |c| c.allow = vec!["127.0.0.1".into()]).await;
    let addr = gw.addr().unwrap();
    let mut rx = gw.take_events().unwrap();
    let token = gw.issue(task(1));

    // Allowed: the tunnel reaches the destination.
    let (mut tunnel, head) = connect(addr, &dest.to_string(), &basic(token.expose())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    tunnel
        .write_all(format!("GET / HTTP/1.1\r\nHost: {dest}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tunnel.read_to_string(&mut answer).await.unwrap();
    assert!(answer.ends_with(&format!("hello from {dest}")), "{answer}");

    // Not on the list: 403, reported with host, port and time, never connected.
    let (_, head) = connect(addr, "example.invalid:443", &basic(token.expose())).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    // No token: 407, also reported.
    let (_, head) = connect(addr, &dest.to_string(), "").await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("proxy-authenticate: basic"),
        "{head}"
    );
    let (_, head) = connect(addr, &dest.to_string(), &basic("cohort-bogus")).await;
    assert!(head.starts_with("HTTP/1.1 407"), "{head}");
    let refused: Vec<_> = events(&mut rx)
        .into_iter()
        .filter_map(|e| match e {
            GatewayEvent::Refused {
                task,
                host,
                port,
                at,
                reason,
            } => {
                assert!(at.elapsed().unwrap() < Duration::from_secs(60));
                Some((task, host, port, reason))
            }
            _ => None,
        })
        .collect();
    assert_eq!(
        refused,
        vec![
            (
                Some(task(1)),
                "example.invalid".to_string(),
                443,
                RefusalReason::NotAllowed
            ),
            (None, "127.0.0.1".to_string(), dest.port(), RefusalReason::NoToken),
            (None, "127.0.0.1".to_string(), dest.port(), RefusalReason::BadToken),
        ]
    );

    // Plain http:// through the proxy (absolute form), as HTTP_PROXY clients send it.
    let via = |t: &str| {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://cohort:{t}@{addr}")).unwrap())
            .build()
            .unwrap()
    };
    let text = via(token.expose())
        .get(format!("http://{dest}/x"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(text, format!("hello from {dest}"));
    // `localhost` is another name, not on the list: refused before it is resolved.
    let resp = via(token.expose())
        .get(format!("http://localhost:{}/x", dest.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);

    // A revoked token closes its open tunnels.
    let (mut open, head) = connect(addr, &dest.to_string(), &basic(token.expose())).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    token.revoke();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest)).await;
    assert!(matches!(read, Ok(Ok(0))), "{read:?}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bridge_carries_a_loopback_port_to_the_gateway_socket() {
    let standin = Standin::start(Options::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gateway.sock");
    let gw = start(&standin, |c| {
        c.tcp = None;
        c.socket = Some(socket.clone());
    })
    .await;
    assert_eq!(gw.addr(), None);
    assert_eq!(gw.socket_path(), Some(socket.as_path()));
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let token = gw.issue(task(1));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let bridge = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["__bridge", "--listen", &listen, "--socket"])
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(&listen).await.is_err() {
        assert!(Instant::now() < deadline, "the bridge never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = client()
        .post(format!("http://{listen}/v1/responses"))
        .bearer_auth(token.expose())
        .json(&first_turn("Task: bridged"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("response.completed"));
    assert_eq!(
        standin.records()[0]["headers"]["authorization"],
        format!("Bearer {KEY}")
    );
    assert_eq!(gw.usage(&task(1)), usage(1000, 200, 50, 1));

    // A second bridge on the same port fails at once, saying why.
    let second = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["__bridge", "--listen", &listen, "--socket"])
        .arg(&socket)
        .output()
        .unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains(&format!("cannot listen on {listen}")), "{err}");
    let missing = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args([
            "__bridge",
            "--listen",
            "127.0.0.1:0",
            "--socket",
            "/nonexistent/gw.sock",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/gw.sock"));
    let not_socket = std::process::Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["__bridge", "--listen", "127.0.0.1:0", "--socket"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!not_socket.status.success());
    assert!(String::from_utf8_lossy(&not_socket.stderr).contains("is not a socket"));

    // The working bridge printed nothing.
    let mut bridge = bridge;
    let _ = bridge.kill();
    let out = bridge.wait_with_output().unwrap();
    assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
    gw.shutdown().await;
    assert!(!socket.exists(), "shutdown leaves the socket behind");
}

fn codex() -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/install-codex.sh");
    let out = std::process::Command::new("sh").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "installing codex: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn real_codex_through_the_gateway_holds_only_its_token() {
    let codex = codex();
    let standin = Standin::start(Options::default()).unwrap();
    let gw = start(&standin, |_| {}).await;
    let token = gw.issue(task(1));
    let addr = gw.addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (home, repo) = (dir.path().join("home"), dir.path().join("repo"));
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&repo).unwrap();
    let config = cohort::agent::codex_events::render_config(
        "gpt-5-codex",
        Some(&cohort::gateway::base_url(addr)),
        "COHORT_GATEWAY_TOKEN",
    );
    std::fs::write(home.join("config.toml"), config).unwrap();
    let mut cmd = tokio::process::Command::new(&codex);
    cmd.args([
        "exec",
        "--json",
        "--sandbox",
        "danger-full-access",
        "--skip-git-repo-check",
        "-C",
    ])
    .arg(&repo)
    .arg("-")
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap())
    .env("HOME", dir.path())
    .env("CODEX_HOME", &home)
    .env("COHORT_GATEWAY_TOKEN", token.expose())
    .envs(token.proxy_env(addr))
    .stdin(std::process::Stdio::piped())
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"Task: write the greeting\n").await.unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
        .await
        .expect("codex finished")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let wrote = std::fs::read_dir(&repo).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("task-write-the-greeting-")
    });
    assert!(wrote, "{stdout}");

    let records = standin.records();
    let posts = records.iter().filter(|r| r["method"] == "POST").count();
    assert_eq!(posts, 2, "{records:?}");
    for r in &records {
        assert_eq!(r["headers"]["authorization"], format!("Bearer {KEY}"));
        assert!(!r.to_string().contains(token.expose()), "the token went upstream");
        let mut rest = r.clone();
        rest["headers"].as_object_mut().unwrap().remove("authorization");
        assert!(
            !rest.to_string().contains(KEY),
            "the key is somewhere else in the request"
        );
    }
    // The gateway counted what codex itself reports in turn.completed.
    let counted = gw.usage(&task(1));
    assert_eq!((counted.input, counted.cached_input, counted.output), (2200, 1200, 75));
    assert_eq!(counted.requests, records.len() as u64);
    assert!(stdout.contains("\"input_tokens\":2200"), "{stdout}");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_configurations_are_refused_at_start() {
    let base = |f: &dyn Fn(&mut GatewayConfig)| {
        let mut c = GatewayConfig::new("http://127.0.0.1:9/v1", Secret::new(KEY));
        f(&mut c);
        c
    };
    let err = |c: GatewayConfig| async move { Gateway::start(c).err().unwrap().to_string() };
    assert!(err(base(&|c| c.tcp = None))
        .await
        .contains("needs a loopback address or a unix socket"));
    assert!(err(base(&|c| c.tcp = Some("0.0.0.0:0".parse().unwrap())))
        .await
        .contains("loopback addresses only"));
    assert!(err(base(&|c| c.task_budget = Some(Budget::Dollars(1.0))))
        .await
        .contains("needs a price"));
    assert!(err(base(&|c| c.allow = vec!["https://github.com".into()]))
        .await
        .contains("not a URL"));
    let e = err(base(&|c| c.upstream = "ftp://x/v1".into())).await;
    assert!(e.contains("http or https"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let e = err(base(&|c| c.socket = Some(file.clone()))).await;
    assert!(e.contains("is not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    // The key is in no error.
    assert!(!e.contains(KEY));
}

/// One scripted answer of `scripted()`: raw bytes, and whether the endpoint
/// closes the connection after them.
fn script(name: &str) -> (Vec<u8>, bool) {
    let completed = |input: u64, output: u64| {
        format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{{\"usage\":\
             {{\"input_tokens\":{input},\"input_tokens_details\":{{\"cached_tokens\":1}},\"output_tokens\":{output}}}}}}}\n\n"
        )
    };
    let delta =
        "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}\n\n";
    match name {
        // No length, no chunks: the body ends when the connection does.
        "close" => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            (format!("{head}{delta}{}", completed(7, 3)).into_bytes(), true)
        }
        // An interim answer first, then a sized JSON body.
        "continue" => {
            let body = r#"{"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":2}}"#;
            let head = format!(
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                body.len()
            );
            (format!("{head}{body}").into_bytes(), false)
        }
        // Chunks cut mid-event, with an extension and a trailer.
        "chunked" => {
            let text = format!("{delta}{}", completed(5, 4));
            let (a, b) = text.split_at(30);
            let body = format!(
                "{:x};ext=1\r\n{a}\r\n{:X}\r\n{b}\r\n0\r\nx-trailer: yes\r\n\r\n",
                a.len(),
                b.len()
            );
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            (format!("{head}{body}").into_bytes(), false)
        }
        // Kept alive by its headers, then closed by the endpoint while idle.
        "stale" => (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}".to_vec(), true),
        // A stream that breaks off mid-chunk.
        "cut" => {
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
            (format!("{head}400\r\n{delta}").into_bytes(), true)
        }
        _ => (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_vec(), false),
    }
}

/// A raw HTTP/1.1 endpoint answering by the last segment of the path (see
/// `script`), for the framings the stand-in (hyper) never uses. Returns its
/// base URL, the request heads it got, and how many connections it accepted.
async fn scripted() -> (String, Arc<Mutex<Vec<String>>>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let conns = Arc::new(AtomicUsize::new(0));
    let (h, c) = (heads.clone(), conns.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let heads = h.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 4096];
                loop {
                    // One request: its head, then its sized body.
                    let end = loop {
                        if let Some(at) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                            break at + 4;
                        }
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&got[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    while got.len() < end + len {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    got.drain(..end + len);
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    heads.lock().unwrap().push(head);
                    let (answer, close) = script(path.rsplit('/').next().unwrap_or(""));
                    if s.write_all(&answer).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}/v1"), heads, conns)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_http_endpoint_is_read_in_every_framing() {
    let (base, heads, conns) = scripted().await;
    let gw = Gateway::start(GatewayConfig::new(base, Secret::new(KEY))).unwrap();
    let mut rx = gw.take_events().unwrap();
    let token = gw.issue(task(1));
    let send = |path: &str| {
        client()
            .post(format!("{}/{path}", gw.base_url().unwrap()))
            .bearer_auth(token.expose())
            .json(&json!({"model": "m"}))
            .send()
    };

    let resp = send("close").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let text = resp.text().await.unwrap();
    assert!(
        text.starts_with("event: response.output_text.delta") && text.ends_with("}}}\n\n"),
        "{text}"
    );
    assert_eq!(gw.usage(&task(1)), usage(7, 1, 3, 1));

    let resp = send("continue").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.text().await.unwrap().contains("\"prompt_tokens\":11"));
    assert_eq!(gw.usage(&task(1)), usage(18, 1, 5, 2));

    let resp = send("chunked").await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.contains("ext=1") && !text.contains("x-trailer"), "{text}");
    assert_eq!(text.matches("event: ").count(), 2, "{text}");
    assert_eq!(gw.usage(&task(1)), usage(23, 2, 9, 3));
    // "continue" and "chunked" went over one kept-alive connection.
    assert_eq!(conns.load(Ordering::SeqCst), 2);

    // A kept-alive connection the endpoint closed is not used again.
    assert_eq!(send("stale").await.unwrap().text().await.unwrap(), "{}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let resp = send("chunked").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap().matches("event: ").count(), 2);
    assert_eq!(conns.load(Ordering::SeqCst), 3);

    // A stream that breaks off is an error for the agent, and still counted.
    // (The gateway may break its connection off before its client has the head.)
    if let Ok(resp) = send("cut").await {
        assert_eq!(resp.status(), 200);
        assert!(resp.text().await.is_err(), "a cut stream read as whole");
    }
    let before = events(&mut rx).len();
    assert!(before >= 6);
    assert_eq!(gw.usage(&task(1)), usage(28, 3, 13, 6));

    // What went upstream: the key, the endpoint's host, never the token.
    for head in heads.lock().unwrap().iter() {
        assert!(head.contains(&format!("authorization: Bearer {KEY}\r\n")), "{head}");
        assert!(head.contains("\r\nhost: 127.0.0.1:"), "{head}");
        assert!(!head.contains(token.expose()), "{head}");
    }
    gw.shutdown().await;

    // Nothing listens: 502 in OpenAI's shape, without the key.
    let gw = Gateway::start(GatewayConfig::new("http://127.0.0.1:1/v1", Secret::new(KEY))).unwrap();
    let token = gw.issue(task(2));
    let (status, body) = post(&gw, "/responses", Some(token.expose()), &first_turn("x")).await;
    assert_eq!(status, 502, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], "upstream_unreachable", "{body}");
    assert!(!body.contains(KEY));
    assert_eq!(gw.usage(&task(2)), usage(0, 0, 0, 1));
    gw.shutdown().await;
}
