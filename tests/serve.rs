//! `cohort serve` and `cohort submit` on the host (no systemd here; the VM test runs the
//! same loop under systemd): requests go through the inbox, are planned and run with the
//! core flow, a killed service resumes its run, bad requests never enter the inbox, one
//! service per state directory, and a crash at any step leaves exactly one outcome.

mod support;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};
use support::*;

struct Service {
    child: Child,
    state: PathBuf,
}

fn serve(s: &Scratch, xdg_state: &Path, agent_name: &str, extra: &[&str]) -> Service {
    let state = xdg_state.join("cohort");
    let child = s
        .cohort()
        .env("XDG_STATE_HOME", xdg_state)
        .env("COHORT_TEST_DELAY", "1.5")
        .env("COHORT_TEST_TALLY", s.tmp.path().join("tally"))
        .args(["serve", "--poll", "200ms", "--state-dir", state.to_str().unwrap()])
        .args(["--runtime", "host", "--agent-command", &agent(agent_name), "-j", "2"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("serve.json", || state.join("serve.json").exists());
    Service { child, state }
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn submit(s: &Scratch, xdg_state: &Path, doc: &Path) -> std::process::Output {
    s.cohort()
        .env("XDG_STATE_HOME", xdg_state)
        .args(["submit", doc.to_str().unwrap()])
        .output()
        .unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn submitted_requests_are_run_and_merged() {
    let s = Scratch::new();
    let xdg = s.tmp.path().join("xdg-state");
    let svc = serve(&s, &xdg, "write.sh", &[]);

    // Bad input is refused at the door: exit 2, nothing enters the inbox.
    let empty = s.request("empty.md", "\n\n");
    let out = submit(&s, &xdg, &empty);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(files(&svc.state.join("inbox")).is_empty());

    let first = s.request("first.md", "- add a greeting\n- add a farewell\n");
    let out = submit(&s, &xdg, &first);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let second = s.request("second.md", "- write the changelog\n");
    assert_eq!(code(&submit(&s, &xdg, &second)), 0);

    wait_for("both requests done", || files(&svc.state.join("done")).len() == 4);
    let done = files(&svc.state.join("done"));
    assert!(done.iter().any(|f| f.ends_with("-first.md")), "{done:?}");
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            svc.state
                .join("done")
                .join(done.iter().find(|f| f.ends_with("first.md.json")).unwrap()),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(json["exit_code"], 0, "{json}");

    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    assert_eq!(
        merged,
        ["001: add a greeting", "001: write the changelog", "002: add a farewell"]
    );
    assert_eq!(merged.len(), 3, "{merged:?}");

    // `status --json` lists the service's runs, each with its request and tasks.
    let out = s.run(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let runs = status["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2, "{status}");
    assert!(runs.iter().all(|r| r["counts"]["merged"].as_u64().unwrap() >= 1));
    assert!(runs
        .iter()
        .any(|r| r["request"].as_str().unwrap().ends_with("-second.md")));

    // The log has one line per task with its run id.
    let log = std::fs::read_to_string(svc.state.join("serve.log")).unwrap();
    assert!(log.contains("run_id=") && log.contains("task_id=2"), "{log}");

    // SIGTERM: a clean stop, exit 0.
    let mut child = svc.child;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert_eq!(s.git(&["status", "--porcelain"]), "", "the user's tree is untouched");
}

#[test]
fn a_killed_service_resumes_its_run_on_restart() {
    let s = Scratch::new();
    let xdg = s.tmp.path().join("xdg-state");
    let svc = serve(&s, &xdg, "slow.sh", &[]);
    let req = s.request("req.md", &tasks_doc(4));
    assert_eq!(code(&submit(&s, &xdg, &req)), 0);
    // Kill it while the run is under way: the request is left in processing/.
    wait_for("the run to start", || {
        !s.git(&["branch", "--list", "cohort/task/*"]).is_empty()
    });
    let mut child = svc.child;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(files(&svc.state.join("processing")).len(), 1);

    // A restart finishes that run (it does not start a new one) and files the request.
    let out = s
        .cohort()
        .env("XDG_STATE_HOME", &xdg)
        .env("COHORT_TEST_DELAY", "0.1")
        .args(["serve", "--once", "--state-dir", svc.state.to_str().unwrap()])
        .args(["--runtime", "host", "--agent-command", &agent("slow.sh")])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert!(files(&svc.state.join("processing")).is_empty());
    let failed: Vec<String> = files(&svc.state.join("failed"))
        .iter()
        .filter(|f| f.ends_with(".json"))
        .map(|f| std::fs::read_to_string(svc.state.join("failed").join(f)).unwrap())
        .collect();
    assert_eq!(
        files(&svc.state.join("done")).len(),
        2,
        "failed: {failed:?}\n{}",
        text(&out)
    );
    let mut merged = s.merged_tasks("cohort/service");
    merged.sort();
    let mut want: Vec<String> = (1..=4).map(|i| format!("{i:03}: task number {i}")).collect();
    want.sort();
    assert_eq!(merged, want, "every task merged exactly once");
    let status: serde_json::Value = serde_json::from_slice(&s.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["runs"].as_array().unwrap().len(), 1, "resumed, not re-run");
    s.fsck();
}

#[test]
fn submit_without_a_service_says_how_to_get_one() {
    let s = Scratch::new();
    let req = s.request("req.md", "- a task\n");
    let out = submit(&s, &s.tmp.path().join("nothing-here"), &req);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("cohort service install"), "{}", text(&out));
}

#[test]
fn serve_without_a_key_for_codex_stops_with_exit_2() {
    let s = Scratch::new();
    let state = s.tmp.path().join("state");
    let out = s
        .cohort()
        .env("HOME", s.tmp.path())
        .args([
            "serve",
            "--once",
            "--state-dir",
            state.to_str().unwrap(),
            "--runtime",
            "host",
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(
        text(&out).contains("cohort keys place openai_api_key"),
        "{}",
        text(&out)
    );
}

#[test]
fn serve_with_a_bad_service_branch_stops_with_exit_2_at_start() {
    let s = Scratch::new();
    let state = s.tmp.path().join("state");
    let out = s
        .cohort()
        .args(["serve", "--once", "--state-dir", state.to_str().unwrap()])
        .args(["--runtime", "host", "--agent-command", &agent("write.sh")])
        .arg("--service-branch=a..b")
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--service-branch \"a..b\""), "{}", text(&out));
    assert!(!state.join("inbox").exists(), "no inbox is set up");
}

/// How many tasks the tally agent worked on (one line each, across runs and restarts).
fn tally(s: &Scratch) -> Vec<String> {
    std::fs::read_to_string(s.tmp.path().join("tally"))
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// `cohort serve --once` on `state` with the tally agent, and the crash hook at `crash_at`.
fn serve_once(s: &Scratch, state: &Path, crash_at: Option<&str>) -> std::process::Output {
    let mut c = s.cohort();
    c.env("COHORT_TEST_TALLY", s.tmp.path().join("tally"))
        .args(["serve", "--once", "--state-dir", state.to_str().unwrap()])
        .args(["--runtime", "host", "--agent-command", &agent("tally.sh")]);
    if let Some(step) = crash_at {
        c.env("COHORT_TEST_CRASH_AT", step);
    }
    c.output().unwrap()
}

/// Every `.json` outcome in done/ and failed/, by place.
fn outcomes(state: &Path) -> Vec<String> {
    ["done", "failed"]
        .iter()
        .flat_map(|d| {
            files(&state.join(d))
                .into_iter()
                .filter(|f| f.ends_with(".json"))
                .map(move |f| format!("{d}/{f}"))
        })
        .collect()
}

#[test]
fn a_second_serve_on_one_state_dir_exits_2_naming_the_first() {
    let s = Scratch::new();
    let xdg = s.tmp.path().join("xdg-state");
    let svc = serve(&s, &xdg, "tally.sh", &[]);
    let first = svc.child.id();
    let req = s.request("req.md", &tasks_doc(2));
    assert_eq!(code(&submit(&s, &xdg, &req)), 0);
    wait_for("the run to start", || {
        !s.git(&["branch", "--list", "cohort/task/*"]).is_empty()
    });

    // What the user did by hand: a second instance while the first runs the request.
    let out = serve_once(&s, &svc.state, None);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains(&format!("PID {first}")), "{}", text(&out));
    let reg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(svc.state.join("serve.json")).unwrap()).unwrap();
    assert_eq!(reg["pid"], first, "the refused one wrote nothing: {reg}");

    // The first one finishes the request: one outcome, in done/.
    wait_for("the request filed", || !outcomes(&svc.state).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let got = outcomes(&svc.state);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(got[0].starts_with("done/"), "{got:?}");
    assert!(files(&svc.state.join("failed")).is_empty());
    assert!(files(&svc.state.join("processing")).is_empty());
    assert_eq!(tally(&s).len(), 2, "each task ran once: {:?}", tally(&s));

    let mut child = svc.child;
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(child.wait().unwrap().code(), Some(0));
    // Once the first is gone, its state directory is free again.
    let out = serve_once(&s, &svc.state, None);
    assert_eq!(code(&out), 0, "{}", text(&out));
}

#[test]
fn a_crash_at_any_step_of_a_request_ends_with_one_outcome_and_one_run() {
    // Each case: the steps at which successive instances are killed (SIGKILL, as kill -9),
    // then one that runs to the end.
    let cases: &[&[&str]] = &[
        &["processing:before"],
        &["processing:after"],
        &["processing:after", "inbox:before"],
        &["processing:after", "inbox:after"],
        &["ran"],
        &["outcome"],
        &["file"],
        &["filed"],
        &["ran", "ran"],
    ];
    for crashes in cases {
        let s = Scratch::new();
        let state = s.tmp.path().join("state");
        let out = serve_once(&s, &state, None);
        assert_eq!(code(&out), 0, "an empty start: {}", text(&out));
        // Handed to a service started by hand, while none runs.
        let req = s.request("req.md", &tasks_doc(2));
        let out = s
            .cohort()
            .args(["submit", req.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(code(&out), 0, "{}", text(&out));
        let landed = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        assert!(
            landed.starts_with(state.join("inbox")) && landed.is_file(),
            "{}",
            text(&out)
        );
        assert!(
            text(&out).contains("no `cohort serve` runs on it now"),
            "{}",
            text(&out)
        );

        for step in *crashes {
            let out = serve_once(&s, &state, Some(step));
            assert_eq!(
                out.status.signal(),
                Some(libc::SIGKILL),
                "{crashes:?} at {step}: {}",
                text(&out)
            );
        }
        let out = serve_once(&s, &state, None);
        assert_eq!(code(&out), 0, "{crashes:?}: {}", text(&out));

        let name = landed.file_name().unwrap().to_string_lossy().into_owned();
        assert_eq!(
            outcomes(&state),
            [format!("done/{name}.json")],
            "{crashes:?}: {}",
            text(&out)
        );
        assert_eq!(
            files(&state.join("done")),
            [name.clone(), format!("{name}.json")],
            "{crashes:?}"
        );
        for d in ["inbox", "processing", "failed"] {
            assert!(
                files(&state.join(d)).is_empty(),
                "{crashes:?}: {d}: {:?}",
                files(&state.join(d))
            );
        }
        assert_eq!(tally(&s).len(), 2, "{crashes:?}: each task ran once: {:?}", tally(&s));
        let status: serde_json::Value = serde_json::from_slice(&s.run(&["status", "--json"]).stdout).unwrap();
        assert_eq!(
            status["runs"].as_array().unwrap().len(),
            1,
            "{crashes:?}: one run: {status}"
        );
        assert_eq!(s.merged_tasks("cohort/service").len(), 2, "{crashes:?}");
    }
}

#[test]
fn submit_to_a_state_dir_names_where_the_request_went_and_refuses_others() {
    let s = Scratch::new();
    let req = s.request("req.md", "- a task\n");
    let nothing = s.tmp.path().join("not-a-service");
    let out = s
        .cohort()
        .args([
            "submit",
            req.to_str().unwrap(),
            "--state-dir",
            nothing.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("cohort serve --state-dir"), "{}", text(&out));

    // A service started by hand in another repository: its requests run there, so a
    // submit from here is refused rather than run in the wrong place.
    let other = Scratch::new();
    let state = other.tmp.path().join("state");
    assert_eq!(code(&serve_once(&other, &state, None)), 0);
    let out = s
        .cohort()
        .args(["submit", req.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("-C "), "{}", text(&out));
    assert!(files(&state.join("inbox")).is_empty());
}

#[test]
fn with_a_retention_the_service_collects_old_runs_after_each_request() {
    let s = Scratch::new();
    let state = s.tmp.path().join("state");
    let config = s.tmp.path().join(".config/cohort/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        "[service]\nretention = { keep_runs = 1, older_than = \"0s\" }\n",
    )
    .unwrap();
    let out = serve_once(&s, &state, None); // makes the inbox
    assert_eq!(code(&out), 0, "{}", text(&out));
    let kept_readme = s.work.join(".git/cohort/pool/checkouts/0/README.md");
    let mut readme_inode = None;
    for i in 1..=4 {
        let doc = s.request(
            &format!("req{i}.md"),
            &format!("- request {i} task a\n- request {i} task b\n"),
        );
        let sub = s
            .cohort()
            .args(["submit", doc.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(code(&sub), 0, "{}", text(&sub));
        let out = serve_once(&s, &state, None);
        assert_eq!(code(&out), 0, "{}", text(&out));
        // Bounded: after each request, only the newest run's branches and directory are left.
        let branches = s.git(&["for-each-ref", "--format=%(refname)", "refs/heads/cohort/task"]);
        let runs: std::collections::BTreeSet<&str> = branches.lines().map(|r| r.split('/').nth(4).unwrap()).collect();
        assert_eq!(runs.len(), 1, "after request {i}: {branches}");
        let dirs = std::fs::read_dir(s.work.join(".git/cohort/runs")).unwrap().count();
        assert_eq!(dirs, 1, "after request {i}");
        // The service keeps its checkouts between requests and moves them by a tree diff: a
        // file no task touches is never written again.
        let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&kept_readme).unwrap());
        assert_eq!(*readme_inode.get_or_insert(inode), inode, "after request {i}");
    }
    assert_eq!(
        s.merged_tasks("cohort/service").len(),
        8,
        "every request's work stays merged"
    );
    s.fsck();
    let log = std::fs::read_to_string(state.join("serve.log")).unwrap_or_default();
    assert!(log.contains("gc after the request"), "{log}");
}

#[test]
fn a_long_failure_reason_arrives_whole_in_serve_log_and_report() {
    // Issue 19: the journal cut a task's reason at "creating…". Two files over
    // max_file_size with 200-character names make a reason far past any display width.
    let s = Scratch::new();
    let state = s.tmp.path().join("state");
    let config = s.tmp.path().join(".config/cohort/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(&config, "[run]\nmax_file_size = \"10\"\n").unwrap();
    let names = [
        format!("{}-first-end.txt", "a".repeat(185)),
        format!("{}-second-end.txt", "b".repeat(185)),
    ];
    let agent = s.tmp.path().join("long-reason.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\necho 'more than ten bytes' > '{}'\necho 'more than ten bytes' > '{}'\n",
            names[0], names[1]
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let serve = || {
        s.cohort()
            .args(["serve", "--once", "--state-dir", state.to_str().unwrap()])
            .args(["--runtime", "host", "--agent-command", agent.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert_eq!(code(&serve()), 0, "an empty start");
    let req = s.request("req.md", "- leave two big files\n");
    let out = s
        .cohort()
        .args(["submit", req.to_str().unwrap(), "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    let out = serve();
    assert_eq!(code(&out), 0, "{}", text(&out));

    let log = std::fs::read_to_string(state.join("serve.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("task 001 failed"))
        .unwrap_or_else(|| panic!("no failure line in serve.log:\n{log}"));
    let report = text(&s.run(&["report"]));
    for name in &names {
        assert!(line.contains(&format!("{name} (20 bytes)")), "cut in serve.log: {line}");
        assert!(
            report.contains(&format!("{name} (20 bytes)")),
            "cut in report: {report}"
        );
    }
    assert!(line.len() > 400, "{line}");
}

/// Bytes the files below `dir` take on disk.
fn disk_use(dir: &Path) -> u64 {
    files_under(dir)
        .iter()
        .filter_map(|p| std::fs::symlink_metadata(p).ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .sum()
}

/// Issue 19: one service process serves 20 requests in a row with a retention: its cohort
/// refs, run directories, `.git/cohort` size and loose objects stay bounded (after request 20
/// as after request 5, once the retention is full), all work stays merged, fsck is clean.
#[test]
fn twenty_requests_in_a_row_keep_refs_and_disk_bounded() {
    let s = Scratch::new();
    let xdg_state = s.tmp.path().join("xdg-state");
    let state = xdg_state.join("cohort");
    let config = s.tmp.path().join(".config/cohort/config.toml");
    std::fs::create_dir_all(config.parent().unwrap()).unwrap();
    std::fs::write(
        &config,
        "[service]\nretention = { keep_runs = 2, older_than = \"0s\" }\n",
    )
    .unwrap();
    // Low enough that the service's gc packs loose objects along the way.
    s.git(&["config", "gc.auto", "60"]);
    let mut child = s
        .cohort()
        .env("XDG_STATE_HOME", &xdg_state)
        .env("COHORT_TEST_TALLY", s.tmp.path().join("tally"))
        .args(["serve", "--poll", "100ms", "--state-dir", state.to_str().unwrap()])
        .args(["--runtime", "host", "--agent-command", &agent("tally.sh"), "-j", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("serve.json", || state.join("serve.json").exists());
    let gcs = || {
        std::fs::read_to_string(state.join("serve.log"))
            .unwrap_or_default()
            .matches("gc after the request")
            .count()
    };
    let mut at_5 = None;
    let t0 = Instant::now();
    for i in 1..=20 {
        let doc = s.request(
            &format!("req{i}.md"),
            &format!("- request {i} task a\n- request {i} task b\n"),
        );
        let sub = submit(&s, &xdg_state, &doc);
        assert_eq!(code(&sub), 0, "{}", text(&sub));
        wait_for(&format!("request {i} and its gc"), || {
            outcomes(&state).len() == i && gcs() == i
        });
        let refs = s
            .git(&[
                "for-each-ref",
                "--format=%(refname)",
                "refs/heads/cohort/task/",
                "refs/cohort/",
            ])
            .lines()
            .count();
        let runs = std::fs::read_dir(s.work.join(".git/cohort/runs")).unwrap().count();
        let cohort_dir = disk_use(&s.work.join(".git/cohort"));
        let loose: u64 = s
            .git(&["count-objects", "-v"])
            .lines()
            .find_map(|l| l.strip_prefix("count: "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(runs <= 2, "after request {i}: {runs} run directories");
        assert!(loose < 60, "after request {i}: {loose} loose objects");
        if i == 5 || i == 20 {
            eprintln!("after request {i}: {refs} cohort refs, {runs} run dirs, .git/cohort {cohort_dir} bytes, {loose} loose objects");
        }
        if i == 5 {
            at_5 = Some((refs, runs, cohort_dir));
        }
        if let Some((refs5, runs5, dir5)) = at_5 {
            assert_eq!(refs, refs5, "cohort refs after request {i} against request 5");
            assert_eq!(runs, runs5, "run directories after request {i} against request 5");
            // Logs and the state DB vary a little from run to run; growth with the number of
            // requests would be 4× from 5 to 20.
            assert!(
                cohort_dir <= dir5 + dir5 / 4,
                "after request {i}: .git/cohort takes {cohort_dir} bytes, {dir5} after request 5"
            );
        }
    }
    eprintln!("20 requests served in {:.1}s", t0.elapsed().as_secs_f64());
    assert!(
        outcomes(&state).iter().all(|o| o.starts_with("done/")),
        "{:?}",
        outcomes(&state)
    );
    assert_eq!(
        s.merged_tasks("cohort/service").len(),
        40,
        "every request's work stays merged"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(st.success() || st.signal().is_some(), "{st:?}");
    s.fsck();
    let log = std::fs::read_to_string(state.join("serve.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("packed_objects=") && !l.contains("packed_objects=0")),
        "the service's gc packed loose objects: {log}"
    );
}
