//! A controller (`cohort run --listen`) and workers (`cohort worker`) on loopback: tasks
//! spread over the workers and merge once; a bad token and a lease the worker does not
//! hold are refused; a worker that goes silent loses its task to another, and its late
//! result is refused; a worker keeps its result through a network outage.

mod support;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

/// `cohort run` serving workers on a free loopback port, in the background (the caller
/// waits for it).
#[allow(clippy::zombie_processes)]
fn start_controller(s: &Scratch, tasks: usize, extra: &[&str]) -> (Child, PathBuf) {
    let agent = agent("slow.sh");
    let mut args = vec!["--agent", "command", "--agent-command", agent.as_str()];
    args.extend(extra);
    start_controller_with(s, s.cohort(), &tasks_doc(tasks), &args)
}

fn start_controller_with(s: &Scratch, cohort: Command, doc: &str, extra: &[&str]) -> (Child, PathBuf) {
    let req = s.request("req.md", doc);
    let mut args = vec!["run", req.to_str().unwrap(), "--listen", "127.0.0.1:0"];
    args.extend(extra);
    spawn_controller(s, cohort, &args)
}

/// Starts `cohort ARGS` and waits until its run is open to workers.
#[allow(clippy::zombie_processes)]
fn spawn_controller(s: &Scratch, mut cohort: Command, args: &[&str]) -> (Child, PathBuf) {
    let log = std::fs::File::create(s.tmp.path().join("controller.log")).unwrap();
    let mut child = cohort
        .args(args)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let runs = s.work.join(".git/cohort/runs");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found = std::fs::read_dir(&runs)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("worker-token").exists() && p.join("controller.json").exists());
        if let Some(dir) = found {
            return (child, dir);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the controller never opened its run: {}", controller_log(s));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn controller_log(s: &Scratch) -> String {
    std::fs::read_to_string(s.tmp.path().join("controller.log")).unwrap_or_default()
}

fn url_of(run_dir: &Path) -> String {
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("controller.json")).unwrap()).unwrap();
    info["url"].as_str().unwrap().to_string()
}

fn token_of(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("worker-token")).unwrap()
}

fn start_worker(s: &Scratch, run_dir: &Path, name: &str, delay: &str) -> Child {
    start_worker_at(s, run_dir, &url_of(run_dir), name, delay)
}

/// A worker that reaches the controller at `url` (e.g. through a proxy).
fn start_worker_at(s: &Scratch, run_dir: &Path, url: &str, name: &str, delay: &str) -> Child {
    let log = std::fs::File::create(s.tmp.path().join(format!("worker-{name}.log"))).unwrap();
    Command::new(env!("CARGO_BIN_EXE_cohort"))
        .args(["worker", "--controller", url, "--name", name, "--tunnel", "127.0.0.1:0"])
        .arg("--dir")
        .arg(s.tmp.path().join(format!("worker-{name}")))
        .env("COHORT_WORKER_TOKEN", token_of(run_dir))
        // A worker's own home, as in its container: not this machine's login profile, which
        // agents' `bash -l` would run.
        .env("HOME", s.tmp.path().join(format!("home-{name}")))
        .env("COHORT_TEST_DELAY", delay)
        .env("COHORT_LOG", "info")
        .env_remove("OPENAI_API_KEY")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn worker_log(s: &Scratch, name: &str) -> String {
    std::fs::read_to_string(s.tmp.path().join(format!("worker-{name}.log"))).unwrap_or_default()
}

fn wait(child: &mut Child, limit: Duration, what: &str) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{what} did not end in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tasks_spread_over_three_workers_and_merge_once() {
    let s = Scratch::new();
    let (mut controller, run_dir) = start_controller(&s, 9, &["-j", "3"]);
    let token = token_of(&run_dir);
    let mut workers: Vec<Child> = ["a", "b", "c"]
        .iter()
        .map(|n| start_worker(&s, &run_dir, n, "1"))
        .collect();
    let code = wait(&mut controller, Duration::from_secs(120), "the run");
    assert_eq!(code, 0, "{}", controller_log(&s));
    for (w, name) in workers.iter_mut().zip(["a", "b", "c"]) {
        // Told the run is over, each worker ends with 0.
        assert_eq!(
            wait(w, Duration::from_secs(30), "a worker"),
            0,
            "{}",
            worker_log(&s, name)
        );
    }
    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    assert_eq!(merged.len(), 9, "{merged:?}");
    merged.dedup();
    assert_eq!(merged.len(), 9);
    let files = s.git(&["ls-tree", "--name-only", "cohort/service"]);
    for i in 1..=9 {
        assert!(files.contains(&format!("task-{i:03}.txt")), "task {i} missing: {files}");
    }
    s.fsck();
    // Every task says where it ran, and all three workers had work.
    let status = s.status_json();
    let placed: std::collections::BTreeSet<String> = status["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["worker"].as_str().expect("a worker per task").to_string())
        .collect();
    assert_eq!(placed.len(), 3, "{status}");
    // The token is gone with the run, and the user's checkout was never written.
    assert!(!run_dir.join("worker-token").exists());
    assert!(!s.work.join("task-001.txt").exists());
    let log = std::fs::read_to_string(run_dir.join("logs/001.log")).unwrap();
    assert!(log.contains("bytes sent"), "{log}");
    // The worker token is in no log, no state, no checkout and no commit.
    let secret = token.trim().rsplit('.').next().unwrap();
    for f in files_under(s.tmp.path()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "the token is in {}",
            f.display()
        );
    }
    assert!(!s.git(&["log", "-p", "--all"]).contains(secret));
}

#[test]
fn a_bad_token_and_a_lease_the_worker_does_not_hold_are_refused() {
    let s = Scratch::new();
    let (mut controller, run_dir) = start_controller(&s, 1, &[]);
    let url = url_of(&run_dir);
    let good = token_of(&run_dir);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        use cohort::remote::client::Client;
        use cohort::remote::token::WorkerToken;
        let token = WorkerToken::parse(&good).unwrap();
        // The right certificate, the wrong secret.
        let forged = WorkerToken::generate(&token.fingerprint);
        let client = Client::new(&url, forged).unwrap();
        let (status, body) = client
            .post("/v1/lease", b"{}".to_vec(), Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 401, "{body:?}");
        // A token for another controller's certificate: the TLS handshake fails.
        let other = Client::new(&url, WorkerToken::generate(&"0".repeat(64))).unwrap();
        assert!(other
            .post("/v1/lease", b"{}".to_vec(), Duration::from_secs(10))
            .await
            .is_err());
        // The run's own token, for a lease it was never given.
        let client = Client::new(&url, token).unwrap();
        let result = serde_json::json!({"exit": {"code": 0}, "changes": [{"path": "task-001.txt",
            "kind": {"file": {"data": "cHduZWQK", "executable": false}}}], "scratch": []});
        let output = serde_json::json!({"lines": [{"err": false, "text": "forged"}]});
        for (what, body) in [("result", &result), ("output", &output), ("heartbeat", &output)] {
            let (status, _) = client
                .post(
                    &format!("/v1/leases/{}/{what}", "ab".repeat(16)),
                    body.to_string().into_bytes(),
                    Duration::from_secs(10),
                )
                .await
                .unwrap();
            assert_eq!(status.as_u16(), 409, "{what}");
        }
    });
    // The task is still there for a real worker, which finishes the run.
    let mut w = start_worker(&s, &run_dir, "real", "0");
    assert_eq!(
        wait(&mut controller, Duration::from_secs(60), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert_eq!(wait(&mut w, Duration::from_secs(30), "the worker"), 0);
    let content = s.git(&["show", "cohort/service:task-001.txt"]);
    assert_eq!(content.trim(), "task number 1");
}

#[test]
fn a_silent_worker_loses_its_task_and_its_late_result_is_refused() {
    let s = Scratch::new();
    // The timeout from the user's config ([run] worker_timeout), as --worker-timeout would.
    let config = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&config).unwrap();
    std::fs::write(config.join("config.toml"), "[run]\nworker_timeout = \"3s\"\n").unwrap();
    let (mut controller, run_dir) = start_controller(&s, 1, &[]);
    let mut a = start_worker(&s, &run_dir, "a", "6");
    let log = run_dir.join("logs/001.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("on| a") {
        assert!(Instant::now() < deadline, "worker a never took the task");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Worker a stops answering (its agent goes on); b is there to take the task over.
    let pid = nix::unistd::Pid::from_raw(a.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let mut b = start_worker(&s, &run_dir, "b", "3");
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("on| b") {
        assert!(
            Instant::now() < deadline + Duration::from_secs(30),
            "worker b never took the task over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Back while b works: whatever a sends for its old lease is refused.
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(
        wait(&mut controller, Duration::from_secs(60), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert_eq!(wait(&mut b, Duration::from_secs(30), "worker b"), 0);
    assert_eq!(
        wait(&mut a, Duration::from_secs(30), "worker a"),
        0,
        "{}",
        worker_log(&s, "a")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("worker a went silent for over 3s"), "{text}");
    assert!(text.contains("on| b"), "{text}");
    assert_eq!(s.merged_tasks("cohort/service").len(), 1);
    let status = s.status_json();
    assert_eq!(status["tasks"][0]["worker"], "b");
    assert_eq!(status["tasks"][0]["status"], "merged");
    // Worker a learnt its lease was gone and sent nothing (or had it refused).
    let a_log = worker_log(&s, "a");
    assert!(a_log.contains("lease was lost"), "{a_log}");
    s.fsck();
}

#[test]
fn the_verify_command_and_its_feedback_rounds_run_on_workers() {
    let s = Scratch::new();
    let (a, v) = (agent("fix-on-feedback.sh"), fixture("verify/values-ok.sh"));
    let v = v.to_str().unwrap();
    let args = [
        "--agent",
        "command",
        "--agent-command",
        a.as_str(),
        "--verify",
        v,
        "-j",
        "2",
    ];
    let (mut controller, run_dir) = start_controller_with(&s, s.cohort(), &tasks_doc(2), &args);
    let mut workers: Vec<Child> = ["a", "b"].iter().map(|n| start_worker(&s, &run_dir, n, "0")).collect();
    assert_eq!(
        wait(&mut controller, Duration::from_secs(120), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    for w in &mut workers {
        assert_eq!(wait(w, Duration::from_secs(30), "a worker"), 0);
    }
    let report = s.status_json();
    for t in report["tasks"].as_array().unwrap() {
        assert_eq!(t["status"], "merged", "{t}");
        assert_eq!(t["attempts"], 1, "fixed within the attempt: {t}");
        let verifies = t["verifies"].as_array().unwrap();
        assert!(verifies.len() >= 2, "{verifies:?}");
        assert_eq!(verifies[0]["passed"], false);
    }
    for i in 1..=2 {
        assert_eq!(s.git(&["show", &format!("cohort/service:value-{i:03}.txt")]), "ok\n");
        let log = std::fs::read_to_string(run_dir.join(format!("logs/{i:03}.log"))).unwrap();
        // The agent's rounds and the verify command all ran on workers.
        assert!(log.contains("verify-on| "), "{log}");
        assert!(log.contains("fixed after the feedback"), "{log}");
    }
    s.fsck();
}

#[test]
fn codex_on_workers_reaches_the_model_only_through_the_controllers_gateway() {
    use cohort_standin::{Options, Standin};
    const KEY: &str = "sk-cohort-remote-test-5d41402abc4b2a76b9719d911017c592";
    let standin = Standin::start(Options::default()).unwrap();
    let s = Scratch::new();
    let wrapper = s.tmp.path().join("codex-recording-env.sh");
    let envs = s.tmp.path().join("envs");
    std::fs::create_dir_all(&envs).unwrap();
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nenv > {}/$$.env\nexec {} \"$@\"\n", envs.display(), codex()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = s.tmp.path().join("cohort.toml");
    std::fs::write(
        &cfg,
        format!("[agent]\nkind = \"codex\"\nmodel = \"gpt-5-codex\"\ncodex_path = {wrapper:?}\n"),
    )
    .unwrap();
    let mut cohort = s.cohort();
    cohort
        .env("OPENAI_API_KEY", KEY)
        .args(["--config", cfg.to_str().unwrap()]);
    let base = standin.base_url();
    let args = ["-j", "2", "--base-url", base.as_str()];
    let (mut controller, run_dir) =
        start_controller_with(&s, cohort, "- add a greeting file\n- add a farewell file\n", &args);
    let mut workers: Vec<Child> = ["a", "b"].iter().map(|n| start_worker(&s, &run_dir, n, "0")).collect();
    assert_eq!(
        wait(&mut controller, Duration::from_secs(180), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    for w in &mut workers {
        assert_eq!(wait(w, Duration::from_secs(30), "a worker"), 0);
    }
    let report = s.status_json();
    for t in report["tasks"].as_array().unwrap() {
        let log =
            std::fs::read_to_string(run_dir.join(format!("logs/{:03}.log", t["index"].as_u64().unwrap()))).unwrap();
        assert_eq!(
            t["status"],
            "merged",
            "{t}\n{log}\n{}",
            worker_log(&s, "a") + &worker_log(&s, "b")
        );
        // The controller's gateway metered every request: they came through a worker's tunnel.
        assert!(t["gateway"]["requests"].as_u64().unwrap() > 0, "{t}");
        assert!(t["worker"].as_str().is_some(), "{t}");
    }
    // codex got a task token and the worker's tunnel, never the key.
    let seen: Vec<String> = files_under(&envs)
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    assert_eq!(seen.len(), 2);
    for env in &seen {
        assert!(!env.contains(KEY), "the key reached an agent");
        assert!(
            !env.contains("COHORT_WORKER_TOKEN"),
            "the worker token reached an agent"
        );
        assert!(env.contains("OPENAI_BASE_URL=http://127.0.0.1:"), "{env}");
    }
    for name in ["a", "b"] {
        assert!(!worker_log(&s, name).contains(KEY));
    }
    s.fsck();
}

/// "worker w ran it: N bytes sent, M bytes received" lines of a task's log.
fn bytes_of(run_dir: &Path, task: usize) -> Vec<(u64, u64)> {
    let log = std::fs::read_to_string(run_dir.join(format!("logs/{task:03}.log"))).unwrap();
    log.lines()
        .filter_map(|l| l.split(" ran it: ").nth(1))
        .map(|rest| {
            let n: Vec<u64> = rest.split(' ').filter_map(|w| w.parse().ok()).collect();
            (n[0], n[1])
        })
        .collect()
}

#[test]
fn a_warm_worker_is_sent_only_what_changed_since_its_last_job() {
    let s = Scratch::new();
    // 300 files of 1 KiB: a cold worker is sent all of them.
    for i in 0..300 {
        s.write(&format!("src/m{}/f{i}.txt", i % 10), &format!("{i:04}").repeat(256));
    }
    s.git(&["add", "."]);
    s.git(&["commit", "-qm", "a bigger tree"]);
    s.git(&["push", "-q", "origin", "main"]);
    let (mut controller, run_dir) = start_controller(&s, 3, &["-j", "1"]);
    let mut w = start_worker(&s, &run_dir, "only", "0");
    assert_eq!(
        wait(&mut controller, Duration::from_secs(120), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert_eq!(wait(&mut w, Duration::from_secs(30), "the worker"), 0);
    assert_eq!(s.merged_tasks("cohort/service").len(), 3);
    let first = bytes_of(&run_dir, 1)[0];
    assert!(first.0 > 300 * 1024, "a cold worker gets the whole tree: {first:?}");
    for task in [2, 3] {
        let (sent, received) = bytes_of(&run_dir, task)[0];
        // The previous task's merged file and the dirty path, plus the job's own fields.
        assert!(sent < 4 * 1024, "task {task}: {sent} bytes sent to a warm worker");
        assert!(received < 2 * 1024, "task {task}: {received} bytes received");
    }
}

#[test]
fn a_hostile_worker_cannot_write_outside_the_tasks_checkout() {
    let s = Scratch::new();
    let outside = s.tmp.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let (mut controller, run_dir) = start_controller(&s, 1, &[]);
    let url = url_of(&run_dir);
    let token = cohort::remote::token::WorkerToken::parse(&token_of(&run_dir)).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = cohort::remote::client::Client::new(&url, token).unwrap();
        let ask = serde_json::json!({"worker": "evil", "slot": {"tree": null, "dirty": []},
            "checkout_path": "/nowhere/checkout", "scratch_path": "/nowhere/scratch"});
        let (status, body) = client
            .post("/v1/lease", ask.to_string().into_bytes(), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(status.as_u16(), 200);
        let job: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let lease = job["lease"].as_str().unwrap();
        // The job names the worker's paths, never the controller's.
        assert!(!String::from_utf8_lossy(&body).contains(s.work.to_str().unwrap()));
        let path = format!("/v1/leases/{lease}/result");
        let post = |changes: serde_json::Value| {
            let result = serde_json::json!({"exit": {"code": 0}, "changes": changes, "scratch": []});
            client.post(&path, result.to_string().into_bytes(), Duration::from_secs(30))
        };
        let file =
            |p: &str| serde_json::json!({"path": p, "kind": {"file": {"data": "cHduZWQK", "executable": false}}});
        for bad in ["../escape.txt", ".git/hooks/post-commit", "/etc/cron.d/x", "a/../../x"] {
            let (status, _) = post(serde_json::json!([file(bad)])).await.unwrap();
            assert_eq!(status.as_u16(), 400, "{bad}");
        }
        // Plain paths, but through a symlink the result itself makes: never followed.
        let link = serde_json::json!({"path": "a", "kind": {"symlink": {"target": outside.to_str().unwrap()}}});
        let (status, _) = post(serde_json::json!([link, file("a/pwned.txt")])).await.unwrap();
        assert_eq!(status.as_u16(), 200);
    });
    assert_eq!(
        wait(&mut controller, Duration::from_secs(60), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something was written outside"
    );
    // The symlink in the way of a directory was replaced by one, inside the checkout; what
    // was merged went through the ordinary collect.
    let tree = s.git(&["ls-tree", "-r", "cohort/service"]);
    assert!(tree.contains("100644 blob") && tree.contains("\ta/pwned.txt"), "{tree}");
    assert!(!tree.contains("120000"), "{tree}");
    s.fsck();
}

/// `[run] listen` in the user's config makes a run listen as `--listen` does; one that is not
/// an address is a usage error that says what to write.
#[test]
fn the_listen_address_can_come_from_config() {
    let s = Scratch::new();
    let config = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&config).unwrap();
    let agent = agent("slow.sh");
    let req = s.request("req.md", &tasks_doc(2));
    let args = [
        "run",
        req.to_str().unwrap(),
        "--agent",
        "command",
        "--agent-command",
        agent.as_str(),
    ];

    std::fs::write(config.join("config.toml"), "[run]\nlisten = \"nowhere\"\n").unwrap();
    let out = s.cohort().args(args).output().unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("[run] listen = \"nowhere\" is not an address"),
        "{}",
        text(&out)
    );
    assert!(
        s.git(&["branch", "--list", "cohort/service"]).trim().is_empty(),
        "nothing changed"
    );

    std::fs::write(config.join("config.toml"), "[run]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let (mut controller, run_dir) = spawn_controller(&s, s.cohort(), &args);
    let mut worker = start_worker(&s, &run_dir, "a", "0");
    assert_eq!(
        wait(&mut controller, Duration::from_secs(120), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert_eq!(
        wait(&mut worker, Duration::from_secs(30), "the worker"),
        0,
        "{}",
        worker_log(&s, "a")
    );
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
}

/// A loopback TCP proxy to `target` that can be cut: while it is down, every connection is
/// closed as soon as it is made.
fn cuttable_proxy(target: std::net::SocketAddr) -> (u16, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = std::sync::Arc::new(AtomicBool::new(true));
    let open = up.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            if !open.load(Ordering::SeqCst) {
                continue; // dropped: closed at once
            }
            let Ok(upstream) = std::net::TcpStream::connect(target) else {
                continue;
            };
            let (mut a, b) = (conn.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut a, &mut b.try_clone().unwrap());
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
            let (mut c, d) = (upstream, conn);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c, &mut d.try_clone().unwrap());
                let _ = d.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    (port, up)
}

/// The controller out of reach while a worker's agent finishes (as on a podman host while
/// containers next to the worker's start or stop): the worker keeps trying to send its
/// result, and the task merges once, from that worker, when the controller is back.
#[test]
fn a_worker_keeps_its_result_through_a_network_outage() {
    use std::sync::atomic::Ordering;
    let s = Scratch::new();
    // A lease outlives the outage: the worker is not taken for silent.
    let (mut controller, run_dir) = start_controller(&s, 1, &["--worker-timeout", "60s"]);
    let url = url_of(&run_dir);
    let target: std::net::SocketAddr = url.trim_start_matches("https://").parse().unwrap();
    let (port, up) = cuttable_proxy(target);
    let mut worker = start_worker_at(&s, &run_dir, &format!("https://127.0.0.1:{port}"), "w", "2");
    let log = run_dir.join("logs/001.log");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("on| w") {
        assert!(Instant::now() < deadline, "the worker never took the task");
        std::thread::sleep(Duration::from_millis(20));
    }
    up.store(false, Ordering::SeqCst);
    // The agent (2 s) ends while the controller is out of reach; the worker's first tries
    // to send its result fail.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !worker_log(&s, "w").contains("cannot send the result") {
        assert!(
            Instant::now() < deadline,
            "no result was tried: {}",
            worker_log(&s, "w")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(worker.try_wait().unwrap().is_none(), "{}", worker_log(&s, "w"));
    up.store(true, Ordering::SeqCst);
    assert_eq!(
        wait(&mut controller, Duration::from_secs(60), "the run"),
        0,
        "{}",
        controller_log(&s)
    );
    assert_eq!(
        wait(&mut worker, Duration::from_secs(30), "the worker"),
        0,
        "{}",
        worker_log(&s, "w")
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("went silent"), "{text}");
    assert_eq!(text.matches("on| ").count(), 1, "{text}");
    assert_eq!(s.merged_tasks("cohort/service").len(), 1);
    assert_eq!(s.status_json()["tasks"][0]["worker"], "w");
    s.fsck();
}
