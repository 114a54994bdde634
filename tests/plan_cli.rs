//! `cohort plan` and the plan inputs of `cohort run`, through the binary.

mod support;
use support::*;

#[test]
fn plan_writes_tasks_and_template() {
    let s = Scratch::new();
    let req = s.request(
        "req.md",
        "# Web\n- [ ] add login\n- [x] old\n1. fix footer\n   on mobile\n",
    );
    let out_dir = s.tmp.path().join("plan");
    let out = s.run(&["plan", req.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
    assert_eq!(code(&out), 0, "{}", text(&out));
    let tasks = std::fs::read_to_string(out_dir.join("tasks.txt")).unwrap();
    assert_eq!(tasks, "Web: add login\nWeb: fix footer on mobile\n");
    assert!(std::fs::read_to_string(out_dir.join("prompt.txt"))
        .unwrap()
        .contains("{task}"));
    // A second plan does not clobber an edited plan without --force.
    let out = s.run(&["plan", req.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("--force"));
    // Without -o nothing is written; the tasks go to stdout.
    let out = s.run(&["plan", req.to_str().unwrap()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Web: add login\nWeb: fix footer on mobile\n"
    );
}

#[test]
fn bad_inputs_exit_2_and_write_nothing() {
    let s = Scratch::new();
    let out_dir = s.tmp.path().join("plan");
    let cases: [(&str, &[u8], &str); 4] = [
        ("empty.md", b"  \n\n", "empty"),
        ("binary.bin", b"\x7fELF\x00\x01\x02garbage", "binary"),
        ("done.md", b"- [x] all done\n- [X] this too\n", "no tasks"),
        ("heading.md", b"# Just a title\n", "no tasks"),
    ];
    for (name, body, msg) in cases {
        let p = s.tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        let out = s.run(&["plan", p.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
        assert_eq!(code(&out), 2, "{name}: {}", text(&out));
        assert!(text(&out).contains(msg), "{name}: {}", text(&out));
        assert!(!out_dir.exists(), "{name}: no partial plan may be written");
    }
    let missing = s.run(&["plan", "/nonexistent/req.md"]);
    assert_eq!(code(&missing), 2, "{}", text(&missing));
}

#[test]
fn run_refuses_template_without_placeholder() {
    let s = Scratch::new();
    let tasks = s.request("tasks.txt", "one\ntwo\n");
    let prompt = s.request("prompt.txt", "Do the thing.\n");
    let out = s.run(&[
        "run",
        "--tasks",
        tasks.to_str().unwrap(),
        "--prompt",
        prompt.to_str().unwrap(),
        "--agent",
        "command",
        "--agent-command",
        &agent("write.sh"),
    ]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("{task}"), "{}", text(&out));
    assert!(
        s.git(&["branch", "--list", "cohort/*"]).is_empty(),
        "nothing may be created"
    );
}

#[test]
fn usage_errors_exit_2_with_help() {
    let s = Scratch::new();
    let out = s.run(&["run"]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    let out = s.run(&["run", "--bogus-flag"]);
    assert_eq!(code(&out), 2);
    std::fs::write(s.work.join("cohort.toml"), "[run]\njosb = 2\n").unwrap();
    let req = s.request("r.md", "- a\n");
    let out = s.run(&["run", req.to_str().unwrap(), "--agent-command", &agent("write.sh")]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("josb"), "{}", text(&out));
    let help = s.run(&["run", "--help"]);
    assert_eq!(code(&help), 0);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--on-conflict"));
}

fn run_plan_files(s: &Scratch, tasks: &str, prompt: &str) -> std::process::Output {
    s.run(&[
        "run",
        "--tasks",
        tasks,
        "--prompt",
        prompt,
        "--agent",
        "command",
        "--agent-command",
        &agent("write.sh"),
    ])
}

#[test]
fn unreadable_plan_files_are_input_errors() {
    let s = Scratch::new();
    let tasks = s.request("tasks.txt", "one\n");
    let prompt = s.request("prompt.txt", "Do {task}.\n");
    let latin1 = s.request("latin1.txt", "");
    std::fs::write(&latin1, b"Do {task} \xe9t\xe9 bien.\n").unwrap();
    let (t, p) = (tasks.to_str().unwrap(), prompt.to_str().unwrap());
    let cases = [
        (t, "/nonexistent/prompt.txt", "cannot read /nonexistent/prompt.txt"),
        ("/nonexistent/tasks.txt", p, "cannot read /nonexistent/tasks.txt"),
        (t, latin1.to_str().unwrap(), "binary"),
    ];
    for (tasks, prompt, msg) in cases {
        let out = run_plan_files(&s, tasks, prompt);
        assert_eq!(code(&out), 2, "{tasks} {prompt}: {}", text(&out));
        assert!(text(&out).contains(msg), "{}", text(&out));
    }
    assert!(s.git(&["branch", "--list", "cohort/*"]).is_empty());
}

#[test]
fn plan_out_dir_that_is_a_file_exits_2() {
    let s = Scratch::new();
    let req = s.request("req.md", "- a task\n");
    let file = s.request("plan-file", "keep me\n");
    let out = s.run(&["plan", req.to_str().unwrap(), "-o", file.to_str().unwrap()]);
    assert_eq!(code(&out), 2, "{}", text(&out));
    assert!(text(&out).contains("not a directory"), "{}", text(&out));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me\n");
}

#[test]
fn dash_c_plans_relative_to_the_repository() {
    let s = Scratch::new();
    s.write("docs/req.md", "- from the repository\n");
    let elsewhere = tempfile::tempdir().unwrap();
    let out = s
        .cohort()
        .current_dir(elsewhere.path())
        .args(["-C", s.work.to_str().unwrap(), "plan", "docs/req.md", "-o", "plan"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 0, "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(s.work.join("plan/tasks.txt")).unwrap(),
        "from the repository\n"
    );
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);
}
