//! `cohort gc` on a repository with 10,000 task refs of old runs (issue 19). Not a timed
//! test: it prints figures for the README.
//!
//!   cargo bench --bench gc -- [--runs 1000] [--tasks 10]
//!
//! The repository is made cheaply but shaped like a service's: a service branch of one merge
//! per task (the task's commit merged into the previous tip, commit times one second apart,
//! written by `git fast-import` into one pack), RUNS × TASKS task branches each naming its
//! task's commit, and the state DB rows of those runs, all finished long ago with every task
//! merged (written through cohort's own `State`, then aged with one UPDATE). No run
//! directories: `gc` would only remove them. gc runs with its defaults (keep the newest 10
//! runs or those younger than 30 days), so all but 10 runs go.
//!
//! Twice: the task refs in `packed-refs` (as a gc leaves them), then as loose files (as runs
//! leave them). Each time `gc --dry-run` and then `gc`, as the CLI, timed from outside.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

#[path = "common/mod.rs"]
#[allow(dead_code)] // its generated repository is for the other benches
mod common;
use common::{arg, git};

const KEEP_RUNS: usize = 10;

fn setup(dir: &Path, runs: usize, tasks: usize, loose: bool) {
    git(dir, &["init", "-q", "-b", "main"]);
    let n = runs * tasks;
    let mut stream = String::new();
    let t0 = 1_700_000_000u64;
    let who = |t: u64| format!("committer bench <bench@example.com> {t} +0000\n");
    stream += "commit refs/heads/main\nmark :1\n";
    stream += &who(t0);
    stream += "data 4\ninit\nM 100644 inline f\ndata 2\n0\n";
    // Task i: its commit (mark 2i) on the service tip, then the merge (mark 2i+1).
    for i in 1..=n {
        let prev = if i == 1 { 1 } else { 2 * i - 1 };
        let t = t0 + 2 * i as u64;
        stream += &format!("commit refs/bench/task\nmark :{}\n", 2 * i);
        stream += &who(t - 1);
        stream += &format!(
            "data 6\ntask {}\nfrom :{prev}\nM 100644 inline f\ndata {}\n{i}\n",
            i % 10,
            i.to_string().len() + 1
        );
        stream += &format!("commit refs/heads/cohort/service\nmark :{}\n", 2 * i + 1);
        stream += &who(t);
        stream += &format!(
            "data 5\nmerge\nfrom :{prev}\nmerge :{}\nM 100644 inline f\ndata {}\n{i}\n",
            2 * i,
            i.to_string().len() + 1
        );
    }
    let marks = dir.join("marks");
    let mut fi = Command::new("git")
        .args(["fast-import", "--quiet", "--force"])
        .arg(format!("--export-marks={}", marks.display()))
        .current_dir(dir)
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    fi.stdin.take().unwrap().write_all(stream.as_bytes()).unwrap();
    assert!(fi.wait().unwrap().success());
    git(dir, &["update-ref", "-d", "refs/bench/task"]);
    let marks = std::fs::read_to_string(&marks).unwrap();
    let mut ids = vec![String::new(); 2 * n + 2];
    for line in marks.lines() {
        let (mark, id) = line.split_once(' ').unwrap();
        ids[mark[1..].parse::<usize>().unwrap()] = id.to_string();
    }

    let state_path = dir.join(".git/cohort/state.db");
    let state = cohort::run::state::State::open(&state_path).unwrap();
    let mut refs = Vec::with_capacity(n);
    for r in 0..runs {
        let run = format!("20260101-0000{r:05}");
        let list: Vec<(String, String)> = (0..tasks)
            .map(|k| (format!("task {k}"), format!("cohort/task/{run}/{:02}-task-{k}", k + 1)))
            .collect();
        for (k, (_, branch)) in list.iter().enumerate() {
            refs.push((format!("refs/heads/{branch}"), ids[2 * (r * tasks + k + 1)].clone()));
        }
        state.create_run(&run, "cohort/service", "{task}", "{}", &list).unwrap();
    }
    drop(state);
    let db = rusqlite::Connection::open(&state_path).unwrap();
    db.execute_batch(
        "UPDATE tasks SET status = 'merged';
         UPDATE runs SET status = 'done', created_at = '2026-01-01T00:00:00.000Z',
                         finished_at = '2026-01-01T00:00:00.000Z';",
    )
    .unwrap();
    // Newest runs by creation time: give each its own second, in run order.
    for r in 0..runs {
        db.execute(
            "UPDATE runs SET created_at = ?2, finished_at = ?2 WHERE id = ?1",
            rusqlite::params![
                format!("20260101-0000{r:05}"),
                format!("2026-01-01T{:02}:{:02}:{:02}.000Z", r / 3600, r / 60 % 60, r % 60)
            ],
        )
        .unwrap();
    }
    drop(db);

    if loose {
        for (name, id) in &refs {
            let p = dir.join(".git").join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, format!("{id}\n")).unwrap();
        }
    } else {
        git(dir, &["pack-refs", "--all"]);
        let packed = dir.join(".git/packed-refs");
        let text = std::fs::read_to_string(&packed).unwrap();
        let mut lines: Vec<(String, String)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
            .map(|l| {
                let (id, name) = l.split_once(' ').unwrap();
                (name.to_string(), id.to_string())
            })
            .chain(refs.iter().cloned())
            .collect();
        lines.sort();
        let mut out = String::from("# pack-refs with: peeled fully-peeled sorted \n");
        for (name, id) in lines {
            out += &format!("{id} {name}\n");
        }
        std::fs::write(&packed, out).unwrap();
    }
    let count = git(dir, &["for-each-ref", "--format=x", "refs/heads/cohort/task/"])
        .lines()
        .count();
    assert_eq!(count, n);
}

fn gc(dir: &Path, home: &Path, extra: &[&str]) -> (f64, String) {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_cohort"))
        .arg("gc")
        .args(extra)
        .current_dir(dir)
        .env("XDG_CACHE_HOME", home.join("cache"))
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_STATE_HOME", home.join("state"))
        .output()
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (secs, String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() {
    let runs: usize = arg("--runs", "1000").parse().unwrap();
    let tasks: usize = arg("--tasks", "10").parse().unwrap();
    println!(
        "gc on {} task refs ({runs} runs × {tasks} tasks, all merged, finished long ago); defaults keep {KEEP_RUNS} runs",
        runs * tasks
    );
    for loose in [false, true] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("repo");
        std::fs::create_dir_all(&dir).unwrap();
        let t = Instant::now();
        setup(&dir, runs, tasks, loose);
        let made = t.elapsed().as_secs_f64();
        let (dry, out) = gc(&dir, tmp.path(), &["--dry-run"]);
        let listed = out.lines().filter(|l| l.trim_start().starts_with("ref ")).count();
        assert_eq!(listed, (runs - KEEP_RUNS) * tasks, "{out}");
        let (real, out) = gc(&dir, tmp.path(), &[]);
        let left = git(&dir, &["for-each-ref", "--format=x", "refs/heads/cohort/task/"])
            .lines()
            .count();
        assert_eq!(left, KEEP_RUNS * tasks, "{out}");
        git(&dir, &["fsck", "--no-progress", "--connectivity-only"]);
        let (again, _) = gc(&dir, tmp.path(), &[]);
        println!(
            "task refs {}: set up in {made:.1}s; gc --dry-run {dry:.2}s; gc {real:.2}s ({} refs removed, {left} left); gc again (nothing to do) {again:.2}s",
            if loose { "loose" } else { "packed" },
            listed,
        );
    }
}
