//! Real remotes: origin behind nginx + `git http-backend` over TLS with basic auth, and
//! behind sshd, on loopback. cohort pulls and pushes in-process (gix over reqwest/rustls;
//! ssh through the user's `ssh`), with the user's credential helper, or the service's own
//! token and deploy key; wrong credentials and an unreachable host are clear errors that
//! move nothing; a push is a compare-and-swap that never drops anybody's commits.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use support::remotes::{ConnectProxy, HttpsOrigin, SshOrigin};
use support::*;

/// The https password, and the service's token in the tests that place one.
const PASSWORD: &str = "tok-cohort-test-9d8c7b6a5f4e3d2c1b0a";

enum Via {
    Https(HttpsOrigin),
    Ssh(SshOrigin),
}

/// A scratch repository whose origin is served over https, with the user's credential
/// helper (`store`) holding the password and `http.sslCAInfo` naming the test CA.
fn over_https(s: &Scratch) -> HttpsOrigin {
    let o = HttpsOrigin::start(s.tmp.path(), PASSWORD);
    s.git(&["remote", "set-url", "origin", &o.url("origin")]);
    s.git(&["config", "http.sslCAInfo", o.ca_pem.to_str().unwrap()]);
    store_credential(s, &o, PASSWORD);
    o
}

fn store_credential(s: &Scratch, o: &HttpsOrigin, password: &str) {
    let file = s.tmp.path().join("git-credentials");
    let line = format!(
        "https://{}:{}@127.0.0.1:{}\n",
        o.user(),
        support::remotes::percent_encode(password),
        o.port
    );
    std::fs::write(&file, line).unwrap();
    s.git(&[
        "config",
        "credential.helper",
        &format!("store --file={}", file.display()),
    ]);
}

/// A scratch repository whose origin is reached over ssh with the test user's key.
fn over_ssh(s: &Scratch) -> SshOrigin {
    let o = SshOrigin::start();
    s.git(&["remote", "set-url", "origin", &o.url(&s.origin)]);
    s.git(&["config", "core.sshCommand", &o.ssh_command()]);
    o
}

fn setup(https: bool) -> (Scratch, Via) {
    let s = Scratch::new();
    let via = if https {
        Via::Https(over_https(&s))
    } else {
        Via::Ssh(over_ssh(&s))
    };
    (s, via)
}

fn run_agent(s: &Scratch, agent_path: &str, doc: &str, extra: &[&str]) -> std::process::Output {
    let req = s.request("req.md", doc);
    let mut args = vec![
        "run",
        req.to_str().unwrap(),
        "--runtime",
        "host",
        "--agent-command",
        agent_path,
    ];
    args.extend(extra);
    s.cohort().env("GIT_TERMINAL_PROMPT", "0").args(&args).output().unwrap()
}

fn run_write(s: &Scratch, extra: &[&str]) -> std::process::Output {
    run_agent(s, &agent("write.sh"), "- write one file\n", extra)
}

/// A commit pushed to origin's `branch` from a second clone (someone else's work).
fn push_from_other(s: &Scratch, branch: &str, file: &str) -> String {
    let other = s.other_clone();
    git_in(&other, &["fetch", "-q", "origin"]);
    let start = if git_cmd()
        .args(["rev-parse", "-q", "--verify", &format!("origin/{branch}")])
        .current_dir(&other)
        .output()
        .unwrap()
        .status
        .success()
    {
        format!("origin/{branch}")
    } else {
        "origin/main".to_string()
    };
    git_in(&other, &["checkout", "-q", "-B", branch, &start]);
    std::fs::write(other.join(file), format!("{file} from someone else\n")).unwrap();
    git_in(&other, &["add", file]);
    git_in(&other, &["commit", "-q", "-m", &format!("someone else's {file}")]);
    git_in(&other, &["push", "-q", "origin", &format!("{branch}:{branch}")]);
    git_in(&other, &["rev-parse", "HEAD"]).trim().to_string()
}

fn origin_ref(s: &Scratch, name: &str) -> String {
    git_in(&s.origin, &["rev-parse", name]).trim().to_string()
}

fn is_ancestor(dir: &Path, a: &str, b: &str) -> bool {
    git_cmd()
        .args(["merge-base", "--is-ancestor", a, b])
        .current_dir(dir)
        .status()
        .unwrap()
        .success()
}

/// Every branch and the user's files, to prove a refusal moved nothing.
fn snapshot(s: &Scratch) -> (String, String) {
    (
        s.git(&["for-each-ref", "--format=%(refname) %(objectname)", "refs/heads"]),
        s.git(&["status", "--porcelain"]),
    )
}

fn pull_and_push(https: bool) {
    let (s, via) = setup(https);
    // Pull: a fast-forward.
    let theirs = push_from_other(&s, "main", "upstream.txt");
    let out = run_write(&s, &["--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.git(&["rev-parse", "main"]).trim(), theirs, "fast-forwarded to origin");
    assert_eq!(s.read("upstream.txt").unwrap(), "upstream.txt from someone else\n");
    // Push: origin has the service branch, and cohort's remote-tracking ref agrees.
    let service = s.git(&["rev-parse", "cohort/service"]).trim().to_string();
    assert_eq!(origin_ref(&s, "refs/heads/cohort/service"), service);
    assert_eq!(s.git(&["rev-parse", "origin/cohort/service"]).trim(), service);
    assert!(text(&out).contains("cohort/service pushed at"), "{}", text(&out));
    let report = s.status_json();
    assert_eq!(report["pushes"][0]["refs"][0]["status"], "pushed", "{report}");
    let shown = text(&s.run(&["report"]));
    assert!(
        shown.contains(&format!("cohort/service pushed at {}", &service[..10])),
        "{shown}"
    );
    // The user's own branch was never pushed: origin's main is still theirs.
    assert_eq!(origin_ref(&s, "refs/heads/main"), theirs);

    // Pull: diverged, then merged (a local commit and one on origin, on other files).
    s.write("ours.txt", "ours\n");
    s.git(&["add", "ours.txt"]);
    s.git(&["commit", "-q", "-m", "ours"]);
    let theirs = push_from_other(&s, "main", "theirs.txt");
    let out = run_write(&s, &["--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(
        is_ancestor(&s.work, &theirs, "main"),
        "origin's commit merged into main"
    );
    assert_eq!(
        s.git(&["log", "-1", "--format=%p", "main"]).split_whitespace().count(),
        2
    );
    assert_eq!(s.read("theirs.txt").unwrap(), "theirs.txt from someone else\n");
    assert_eq!(
        origin_ref(&s, "refs/heads/cohort/service"),
        s.git(&["rev-parse", "cohort/service"]).trim()
    );
    s.fsck();
    if let Via::Https(o) = &via {
        let log = o.access_log();
        assert!(log.contains("git-receive-pack"), "{log}");
        assert!(
            log.contains("git_protocol=\"version=2\""),
            "the fetch speaks protocol v2: {log}"
        );
    }
}

#[test]
fn https_pull_and_push() {
    pull_and_push(true);
}

#[test]
fn ssh_pull_and_push() {
    pull_and_push(false);
}

/// An agent that, while its task runs, has someone else push to origin's service branch:
/// cohort's push then finds origin moved since its fetch.
fn rival_agent(s: &Scratch) -> String {
    let other = s.other_clone();
    git_in(&other, &["config", "user.name", "Rival"]);
    git_in(&other, &["config", "user.email", "rival@example.com"]);
    let path = s.tmp.path().join("rival.sh");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nset -e\nprintf '%s\\n' \"$COHORT_TASK\" > \"task-$COHORT_TASK_ID.txt\"\n\
             cd '{}'\nexport GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'\n\
             git fetch -q origin\ngit checkout -q -B cohort/service origin/cohort/service\n\
             echo rival > rival.txt\ngit add rival.txt\ngit commit -q -m rival\n\
             git push -q origin cohort/service\n",
            other.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.display().to_string()
}

fn push_rejected_then_retried(https: bool) {
    let (s, _via) = setup(https);
    let out = run_write(&s, &["--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));

    let rival = rival_agent(&s);
    let out = run_agent(&s, &rival, "- race the push\n", &["--push"]);
    assert_eq!(code(&out), 1, "a rejected push is exit 1: {}", text(&out));
    assert!(text(&out).contains("rejected"), "{}", text(&out));
    assert!(text(&out).contains("stale info"), "the reason is said: {}", text(&out));
    let rivals = origin_ref(&s, "refs/heads/cohort/service");
    assert_eq!(
        git_in(&s.origin, &["log", "-1", "--format=%s", "refs/heads/cohort/service"]),
        "rival\n",
        "origin kept the rival's push"
    );
    let ours = s.git(&["rev-parse", "cohort/service"]).trim().to_string();
    assert!(s.git(&["ls-tree", "--name-only", &ours]).contains("task-001.txt"));
    let report = s.status_json();
    assert_eq!(report["pushes"][0]["refs"][0]["status"], "rejected", "{report}");
    let shown = text(&s.run(&["report"]));
    assert!(
        shown.contains("push of cohort/service to") && shown.contains("stale info"),
        "{shown}"
    );

    // The next run fetches, merges origin's service branch into cohort's, and pushes both.
    let out = run_write(&s, &["--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let now = origin_ref(&s, "refs/heads/cohort/service");
    assert!(is_ancestor(&s.origin, &rivals, &now), "the rival's commit is kept");
    assert!(is_ancestor(&s.origin, &ours, &now), "the rejected run's work is pushed");
    s.fsck();
}

#[test]
fn https_push_rejected_when_origin_moved_then_retried() {
    push_rejected_then_retried(true);
}

#[test]
fn ssh_push_rejected_when_origin_moved_then_retried() {
    push_rejected_then_retried(false);
}

#[test]
fn wrong_credentials_are_exit_2_and_move_nothing() {
    // https: the credential helper holds a wrong password.
    let (s, via) = setup(true);
    let Via::Https(o) = &via else { unreachable!() };
    store_credential(&s, o, "not-the-password");
    s.write("README.md", "# local change\n");
    let before = snapshot(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let err = text(&out);
    assert!(err.contains(&o.url("origin")) && err.contains("credential"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");
    assert_eq!(snapshot(&s), before, "nothing moved");

    // ssh: a key the server does not know.
    let (s, via) = setup(false);
    let Via::Ssh(o) = &via else { unreachable!() };
    s.git(&["config", "core.sshCommand", &o.ssh_command_with(&o.wrong_key)]);
    let before = snapshot(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("git_ssh_key"), "says how to fix it: {}", text(&out));
    assert_eq!(snapshot(&s), before, "nothing moved");
}

#[test]
fn an_unreachable_origin_is_exit_1_and_moves_nothing() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for url in [
        format!("https://127.0.0.1:{closed}/git/origin.git"),
        format!("ssh://root@127.0.0.1:{closed}/srv/origin.git"),
    ] {
        let s = Scratch::new();
        s.git(&["remote", "set-url", "origin", &url]);
        s.git(&["config", "core.sshCommand", "ssh -F /dev/null -o BatchMode=yes"]);
        let before = snapshot(&s);
        let out = run_write(&s, &[]);
        assert_eq!(code(&out), 1, "{url}: {}", text(&out));
        assert!(text(&out).contains("cannot reach origin"), "{}", text(&out));
        assert_eq!(snapshot(&s), before, "nothing moved");
    }
}

#[test]
fn https_honours_proxy_extra_header_redirects_and_protocol_v1() {
    let (s, via) = setup(true);
    let Via::Https(o) = &via else { unreachable!() };
    // http.proxy, then https_proxy from the environment.
    let proxy = ConnectProxy::start();
    s.git(&["config", "http.proxy", &proxy.url()]);
    assert_eq!(code(&run_write(&s, &[])), 0);
    let target = format!("127.0.0.1:{}", o.port);
    assert!(proxy.targets().contains(&target), "{:?}", proxy.targets());
    s.git(&["config", "--unset", "http.proxy"]);
    let env_proxy = ConnectProxy::start();
    let out = s
        .cohort()
        .env("https_proxy", env_proxy.url())
        .args(["run", "--runtime", "host", "--agent-command", &agent("write.sh")])
        .arg(s.request("p.md", "- via the environment's proxy\n"))
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(env_proxy.targets().contains(&target), "{:?}", env_proxy.targets());

    // http.extraHeader: refused without it, served with it.
    s.git(&["remote", "set-url", "origin", &o.header_url("origin")]);
    let out = run_write(&s, &[]);
    assert_ne!(code(&out), 0, "{}", text(&out));
    s.git(&["config", "http.extraHeader", "X-Cohort-Test: yes"]);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    s.git(&["config", "--unset", "http.extraHeader"]);

    // A redirect is followed.
    s.git(&["remote", "set-url", "origin", &o.redirect_url("origin")]);
    let theirs = push_from_other(&s, "main", "redirected.txt");
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(is_ancestor(&s.work, &theirs, "main"));

    // protocol.version = 1.
    s.git(&["remote", "set-url", "origin", &o.url("origin")]);
    s.git(&["config", "protocol.version", "1"]);
    let lines = o.access_log().lines().count();
    let theirs = push_from_other(&s, "main", "v1.txt");
    let out = run_write(&s, &["--push"]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(is_ancestor(&s.work, &theirs, "main"));
    let log = o.access_log();
    let new: Vec<&str> = log.lines().skip(lines).collect();
    assert!(!new.is_empty(), "{log}");
    assert!(new.iter().all(|l| !l.contains("version=2")), "{new:?}");
}

/// The system service's way to a token: systemd decrypts it into $CREDENTIALS_DIRECTORY.
fn credentials_dir(s: &Scratch, name: &str, value: &str) -> PathBuf {
    let dir = s.tmp.path().join("credentials");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("cohort.{name}")), value).unwrap();
    dir
}

#[test]
fn the_service_token_is_the_https_credential_and_is_nowhere_else() {
    let s = Scratch::new();
    let o = HttpsOrigin::start(s.tmp.path(), PASSWORD);
    // No credential helper: only the token. A deploy token's user name is in the URL.
    s.git(&[
        "remote",
        "set-url",
        "origin",
        &format!("https://{}@127.0.0.1:{}/git/origin.git", o.user(), o.port),
    ]);
    s.git(&["config", "http.sslCAInfo", o.ca_pem.to_str().unwrap()]);
    let creds = credentials_dir(&s, "git_token", &format!("{PASSWORD}\n"));
    let env_dump = s.tmp.path().join("agent-env");
    let agent = s.tmp.path().join("env-agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\nenv >> '{}'\necho \"$COHORT_TASK\" > t-$COHORT_TASK_ID.txt\n",
            env_dump.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let theirs = push_from_other(&s, "main", "upstream.txt");
    let req = s.request("req.md", "- one\n");
    let out = s
        .cohort()
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("GIT_TERMINAL_PROMPT", "0")
        .args([
            "run",
            req.to_str().unwrap(),
            "--runtime",
            "host",
            "--push",
            "--agent-command",
        ])
        .arg(&agent)
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(is_ancestor(&s.work, &theirs, "main"));
    assert_eq!(
        origin_ref(&s, "refs/heads/cohort/service"),
        s.git(&["rev-parse", "cohort/service"]).trim()
    );
    assert!(o.access_log().contains(&format!("user=\"{}\"", o.user())));

    // The token is in no output, file of the repository (state DB, logs, config), commit,
    // or agent's environment.
    assert!(!text(&out).contains(PASSWORD));
    for f in files_under(&s.work.join(".git")) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(PASSWORD.len()).any(|w| w == PASSWORD.as_bytes()),
            "token in {}",
            f.display()
        );
    }
    assert!(!s.git(&["log", "--all", "-p", "--format=%B"]).contains(PASSWORD));
    let env = std::fs::read_to_string(&env_dump).unwrap();
    assert!(!env.contains(PASSWORD), "the agent saw the token:\n{env}");

    // Without it, the same pull is refused: exit 2, and nothing moved.
    let before = snapshot(&s);
    let out = run_write(&s, &[]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("git_token"), "{}", text(&out));
    assert_eq!(snapshot(&s), before);
}

struct Serve {
    child: Child,
    state: PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for(what: &str, log: &Path, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "timed out waiting for {what}; the service's log:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_service_pulls_and_pushes_over_ssh_with_its_deploy_key() {
    let s = Scratch::new();
    let o = SshOrigin::start();
    s.git(&["remote", "set-url", "origin", &o.url(&s.origin)]);
    // The host key is known; the identity is only the service's deploy key.
    s.git(&[
        "config",
        "core.sshCommand",
        &format!(
            "ssh -F /dev/null -o UserKnownHostsFile={} -o StrictHostKeyChecking=yes",
            o.known_hosts.display()
        ),
    ]);
    let key = std::fs::read_to_string(&o.user_key).unwrap();
    let creds = credentials_dir(&s, "git_ssh_key", &key);
    let runtime = s.tmp.path().join("runtime");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(&runtime, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let xdg = s.tmp.path().join("xdg-state");
    let state = xdg.join("cohort");
    let theirs = push_from_other(&s, "main", "upstream.txt");
    let child = s
        .cohort()
        .env("XDG_STATE_HOME", &xdg)
        .env("CREDENTIALS_DIRECTORY", &creds)
        .env("RUNTIME_DIRECTORY", &runtime)
        .args([
            "serve",
            "--poll",
            "200ms",
            "--state-dir",
            state.to_str().unwrap(),
            "--push",
        ])
        .args(["--runtime", "host", "--agent-command", &agent("write.sh")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let svc = Serve { child, state };
    wait_for("serve.json", &svc.state.join("serve.log"), || {
        svc.state.join("serve.json").exists()
    });
    let identity = runtime.join("git_ssh_key");
    let mode = std::fs::metadata(&identity).unwrap().permissions();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&identity).unwrap().trim_end(), key.trim_end());

    let doc = s.request("first.md", "- add a greeting\n");
    let out = s
        .cohort()
        .env("XDG_STATE_HOME", &xdg)
        .args(["submit", doc.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    wait_for("the request done", &svc.state.join("serve.log"), || {
        std::fs::read_dir(svc.state.join("done"))
            .map(|d| d.count() >= 2)
            .unwrap_or(false)
    });
    // It pulled before the request and pushed after it.
    assert!(is_ancestor(&s.work, &theirs, "main"));
    assert_eq!(
        origin_ref(&s, "refs/heads/cohort/service"),
        s.git(&["rev-parse", "cohort/service"]).trim()
    );
    assert!(s
        .git(&["ls-tree", "--name-only", "cohort/service"])
        .contains("task-001.txt"));
    // The key is nowhere but its runtime file: not in the repository, the state or the log.
    // Line 4: private key material (line 2 is the same header for every ed25519 key).
    let needle = key.lines().nth(3).unwrap();
    for f in files_under(&s.work.join(".git"))
        .into_iter()
        .chain(files_under(&svc.state))
    {
        let bytes = std::fs::read(&f).unwrap();
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "key in {}",
            f.display()
        );
    }
}

#[test]
fn failed_tasks_branches_are_pushed_for_review_when_asked() {
    let (s, _via) = setup(true);
    // Your own settings (trusted): push the branches of tasks that did not merge.
    let conf = s.tmp.path().join(".config/cohort");
    std::fs::create_dir_all(&conf).unwrap();
    std::fs::write(
        conf.join("config.toml"),
        "[run]\npush = true\npush_tasks = \"failed\"\n",
    )
    .unwrap();
    let out = run_agent(&s, &agent("fail.sh"), "- leave some work and fail\n", &[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let report = s.status_json();
    let branch = report["tasks"][0]["branch"].as_str().unwrap().to_string();
    assert_eq!(report["tasks"][0]["status"], "failed", "{report}");
    assert_eq!(
        origin_ref(&s, &format!("refs/heads/{branch}")),
        s.git(&["rev-parse", &branch]).trim(),
        "the failed task's branch is on origin"
    );
    assert!(git_in(&s.origin, &["ls-tree", "--name-only", &branch]).contains("partial-001.txt"));
    let pushed: Vec<&str> = report["pushes"][0]["refs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["branch"].as_str().unwrap())
        .collect();
    assert_eq!(pushed, ["cohort/service", branch.as_str()], "{report}");

    // Without push_tasks, no task branch leaves the machine.
    std::fs::write(conf.join("config.toml"), "[run]\npush = true\n").unwrap();
    let out = run_agent(&s, &agent("fail.sh"), "- fail again\n", &[]);
    assert_eq!(code(&out), 1, "{}", text(&out));
    let second = s.status_json()["tasks"][0]["branch"].as_str().unwrap().to_string();
    assert!(git_cmd()
        .args(["rev-parse", "-q", "--verify", &format!("refs/heads/{second}")])
        .current_dir(&s.origin)
        .output()
        .unwrap()
        .stdout
        .is_empty());
}

#[test]
fn git_credentials_in_home_work_and_none_at_all_is_exit_2() {
    let (s, via) = setup(true);
    let Via::Https(o) = &via else { unreachable!() };
    // `credential.helper = store` reads ~/.git-credentials, as git does.
    let home = s.tmp.path().join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::write(
        home.join(".git-credentials"),
        format!("https://{}:{PASSWORD}@127.0.0.1:{}\n", o.user(), o.port),
    )
    .unwrap();
    s.git(&["config", "credential.helper", "store"]);
    let theirs = push_from_other(&s, "main", "upstream.txt");
    let req = s.request("req.md", "- one\n");
    let run = |home: &Path| {
        s.cohort()
            .env("HOME", home)
            .args([
                "run",
                req.to_str().unwrap(),
                "--runtime",
                "host",
                "--push",
                "--agent-command",
            ])
            .arg(agent("write.sh"))
            .output()
            .unwrap()
    };
    let out = run(&home);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(is_ancestor(&s.work, &theirs, "main"));

    // No credential anywhere, and no terminal to ask on: exit 2 naming the remote and the
    // fix, and nothing moved.
    let empty = s.tmp.path().join("empty-home");
    std::fs::create_dir_all(&empty).unwrap();
    push_from_other(&s, "main", "more.txt");
    let before = snapshot(&s);
    let out = run(&empty);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains(&o.url("origin")), "{}", text(&out));
    assert!(text(&out).contains("credential.helper"), "{}", text(&out));
    assert_eq!(snapshot(&s), before);
}
