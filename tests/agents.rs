//! What an agent gets from cohort, and what cohort does about what an
//! agent leaves behind: escaped processes, ignored files, concurrency, and
//! the live display on a terminal.

mod support;
use std::process::Stdio;
use std::time::{Duration, Instant};
use support::*;

/// Runs cohort to its end, failing the test (and killing cohort) after
/// `secs` instead of hanging.
fn run_within(mut cmd: std::process::Command, secs: u64) -> std::process::Output {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "cohort did not finish within {secs} s: {}",
                text(&child.wait_with_output().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.wait_with_output().unwrap()
}

fn run_cmd(s: &Scratch, doc: &str, agent_cmd: &str, extra: &[&str]) -> std::process::Command {
    let req = s.request("req.md", doc);
    let mut cmd = s.cohort();
    cmd.args(["run", req.to_str().unwrap(), "--agent-command", agent_cmd])
        .args(extra);
    cmd
}

#[test]
fn a_process_that_left_the_agents_group_neither_blocks_nor_outlives_its_task() {
    let s = Scratch::new();
    let pids = s.tmp.path().join("pids");
    let mut cmd = run_cmd(&s, &tasks_doc(2), &agent("escape.sh"), &["-j", "1"]);
    cmd.env("COHORT_TEST_PIDS", &pids);
    let out = run_within(cmd, 120);
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(s.merged_tasks("cohort/service").len(), 2);
    let recorded = std::fs::read_to_string(&pids).unwrap();
    assert_eq!(recorded.lines().count(), 2);
    for pid in recorded.split_whitespace() {
        assert!(gone(pid), "escaped process {pid} outlived its task");
    }
}

#[test]
fn ignored_files_never_reach_a_later_tasks_commit() {
    let s = Scratch::new();
    let out = run_within(run_cmd(&s, &tasks_doc(2), &agent("ignored.sh"), &["-j", "1"]), 120);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let second = report["tasks"][1]["branch"].as_str().unwrap().to_string();
    let files = s.git(&["ls-tree", "-r", "--name-only", &second]);
    assert!(
        !files.contains("notes.log"),
        "task 2 committed task 1's ignored file: {files}"
    );
    assert!(!files.contains(".gitignore"), "{files}");
    assert!(
        files.contains("task-001.txt") && files.contains("task-002.txt"),
        "{files}"
    );
}

#[test]
fn the_agent_gets_its_prompt_file_task_and_environment() {
    let s = Scratch::new();
    let tasks = s.request("tasks.txt", "fix the \"parser\"; then $(exit 1)\n");
    let prompt = s.request("prompt.txt", "Please do this: {task}\nThanks.\n");
    let out = s.run(&[
        "run",
        "--tasks",
        tasks.to_str().unwrap(),
        "--prompt",
        prompt.to_str().unwrap(),
        "--agent-command",
        &format!("{} {{prompt_file}} {{task}}", agent("record.sh")),
    ]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let report = s.status_json();
    let run_id = report["run"]["id"].as_str().unwrap();
    let task = "fix the \"parser\"; then $(exit 1)";
    let seen = s.git(&["show", "cohort/service:seen-001.txt"]);
    let (head, body) = seen.split_once("--- prompt\n").unwrap();
    let fields: std::collections::HashMap<&str, &str> = head.lines().filter_map(|l| l.split_once('=')).collect();
    assert_eq!(fields["arg2"], task);
    assert_eq!(fields["task"], task);
    assert_eq!(fields["id"], "001");
    assert_eq!(fields["run"], run_id);
    assert_eq!(fields["arg1"], fields["prompt_env"]);
    assert_eq!(fields["where"], "outside the checkout");
    assert_eq!(body, format!("Please do this: {task}\nThanks.\n"));
    // The prompt file itself was never committed.
    let files = s.git(&["ls-tree", "-r", "--name-only", "cohort/service"]);
    assert_eq!(files.lines().filter(|f| f.contains("prompt")).count(), 0, "{files}");
}

#[test]
fn at_most_j_agents_run_at_once() {
    let s = Scratch::new();
    let dir = s.tmp.path().join("count");
    std::fs::create_dir(&dir).unwrap();
    let mut cmd = run_cmd(&s, &tasks_doc(8), &agent("count.sh"), &["-j", "3"]);
    cmd.env("COHORT_TEST_DIR", &dir);
    let out = run_within(cmd, 120);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let seen: Vec<usize> = std::fs::read_to_string(dir.join("seen"))
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(seen.len(), 16);
    let most = *seen.iter().max().unwrap();
    assert!(most <= 3, "{most} agents ran at once with -j 3");
    assert!(most >= 2, "agents never overlapped: {seen:?}");
}

/// On a terminal, a run shows live bars (one per running task and an
/// overall one); elsewhere (every other test) plain timestamped lines.
#[test]
fn live_progress_bars_on_a_terminal() {
    use std::io::Read;
    let s = Scratch::new();
    let size = nix::pty::Winsize {
        ws_row: 24,
        ws_col: 100,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&size), None).unwrap();
    let mut cmd = run_cmd(&s, &tasks_doc(3), &agent("slow.sh"), &["-j", "2"]);
    cmd.env("COHORT_TEST_DELAY", "0.8")
        .stdout(Stdio::null())
        .stderr(Stdio::from(pty.slave));
    let mut child = cmd.spawn().unwrap();
    drop(cmd); // our copy of the terminal's other end
    let mut master = std::fs::File::from(pty.master);
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        // Ends with EIO once cohort, the last holder of the other end, exits.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    assert!(child.wait().unwrap().success());
    let screen = reader.join().unwrap();
    // The overall bar, redrawn in place (the cursor moves up over it).
    assert!(screen.contains("] 0/3 tasks done"), "no overall bar: {screen:?}");
    assert!(screen.contains("\u{1b}[1A"), "no redrawing: {screen:?}");
    // A bar per running task (prefix, then the task), and its end as a line.
    for i in 1..=3 {
        assert!(
            screen.contains(&format!("task {i:03} task number {i}")),
            "no bar for task {i}: {screen:?}"
        );
        assert!(screen.contains(&format!("task {i:03} merged")), "{screen:?}");
    }
    assert_eq!(s.merged_tasks("cohort/service").len(), 3);
}

/// Not on a terminal (under systemd, in a pipe), a run writes plain lines,
/// each with its time.
#[test]
fn plain_timestamped_lines_elsewhere() {
    let s = Scratch::new();
    let out = run_within(run_cmd(&s, &tasks_doc(2), &agent("write.sh"), &[]), 120);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains('\u{1b}'),
        "terminal control sequences in a pipe: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines.len() >= 6, "{stderr}");
    for line in lines {
        let stamp = line.split(' ').next().unwrap();
        assert!(
            humantime::parse_rfc3339(stamp).is_ok(),
            "a line without its time: {line:?}"
        );
    }
}
