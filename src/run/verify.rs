//! verify: the project's check (`[verify] command`, `--verify`) in a checkout, in the run's
//! runtime (the task's container image for podman), with the warm caches of a slot. What it
//! printed is kept as its failure: the exit status and the last 16 KiB, ANSI stripped, which
//! is what the agent gets back to fix.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::caches::{CacheSlots, CacheSpec};
use super::verifies::{VerifyKind, VerifyRow};
use super::{blocking, Engine};
use crate::agent::Invocation;
use crate::git::pool::Checkout;
use crate::git::Oid;
use crate::runtime::{Bind, Exit, Output, Role, Spawn};

/// How much of the verify output the agent gets back.
pub const TAIL_BYTES: usize = 16 * 1024;

/// The verify gate's settings, resolved once (flags > trusted config > stored run options).
#[derive(Debug, Clone)]
pub struct VerifySettings {
    pub argv: Vec<String>,
    pub timeout: Option<Duration>,
    /// Feedback rounds after a failure (`[verify] retries`, default 2).
    pub retries: u32,
    /// Verify each merge result before the service branch moves (`[verify] merged`).
    pub merged: bool,
    pub caches: Vec<CacheSpec>,
}

impl VerifySettings {
    /// What a run stores of these settings, for `resume` and `retry` (read back by the CLI).
    pub fn to_stored(&self) -> serde_json::Value {
        serde_json::json!({
            "argv": self.argv,
            "timeout_secs": self.timeout.map(|d| d.as_secs()),
            "retries": self.retries,
            "merged": self.merged,
            "caches": self.caches.iter().map(|c| c.written.clone()).collect::<Vec<_>>(),
        })
    }

    pub fn describe(&self) -> String {
        shlex::try_join(self.argv.iter().map(String::as_str)).unwrap_or_else(|_| self.argv.join(" "))
    }
}

/// What one verify run found.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub passed: bool,
    /// The failure as the agent and the report see it (None when it passed).
    pub failure: Option<String>,
    /// Stopped by Ctrl-C or SIGTERM: neither passed nor failed, and not recorded.
    pub cancelled: bool,
}

/// Which verify run this is, for the record.
pub(super) struct Which {
    pub idx: usize,
    pub attempt: u32,
    pub round: u32,
    pub kind: VerifyKind,
}

/// Runs the verify command in `checkout`, which holds `commit` (tree `tree`), and records
/// the outcome. A tree that already passed in this run is not verified again.
pub(super) async fn verify(
    e: &Arc<Engine>,
    run_id: &str,
    settings: &VerifySettings,
    checkout: &Checkout,
    (commit, tree): (Oid, Oid),
    which: Which,
    log: &mut std::fs::File,
) -> Result<Verdict> {
    let what = match which.kind {
        VerifyKind::Task => format!("the task's commit {}", crate::git::short(commit)),
        VerifyKind::Merge => format!("the merge {}", crate::git::short(commit)),
    };
    if e.state()?.tree_passed(run_id, &tree.to_string())? {
        writeln!(log, "--- verify {what}: this tree already passed, not run again")?;
        return Ok(Verdict {
            passed: true,
            failure: None,
            cancelled: false,
        });
    }
    writeln!(log, "--- verify {what}: {}", settings.describe())?;
    // The command runs the agent's code: from here on, the checkout's files are not vouched for.
    checkout.mark_unclean()?;
    let slots = CacheSlots::new(
        e.paths.cohort_dir().join("caches"),
        &e.paths.common_dir,
        settings.caches.clone(),
    );
    let host = e.runtime.name() == "host";
    let lease = blocking(move || slots.lease(host)).await?;
    if !lease.caches.is_empty() {
        writeln!(log, "--- verify caches: slot {}", lease.slot)?;
    }
    let spawn = Spawn {
        invocation: Invocation {
            program: settings.argv[0].clone(),
            args: settings.argv[1..].to_vec(),
            env: vec![
                ("COHORT_VERIFY".into(), "1".into()),
                ("COHORT_RUN_ID".into(), run_id.to_string()),
                ("COHORT_TASK_ID".into(), format!("{:03}", which.idx)),
            ],
            ..Default::default()
        },
        workdir: checkout.path.clone(),
        binds: vec![
            Bind {
                path: checkout.git_dir.clone(),
                writable: true,
            },
            Bind {
                path: checkout.common_dir.join("objects"),
                writable: false,
            },
        ],
        timeout: settings.timeout,
        run_id: run_id.to_string(),
        task: which.idx,
        gateway_socket: None,
        role: Role::Verify,
        caches: lease.caches.clone(),
        tree: Some(tree),
        scratch: None,
    };
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let runtime = e.runtime.clone();
    let cancel = e.cancel.child_token();
    let running = tokio::spawn(async move { runtime.run(spawn, tx, cancel).await });
    let mut tail = Tail::default();
    while let Some(line) = rx.recv().await {
        let (tag, text) = match &line {
            Output::Stdout(t) => ("verify", t),
            Output::Stderr(t) => ("verify-err", t),
            Output::Placed(w) => ("verify-on", w),
        };
        writeln!(log, "{tag}| {text}")?;
        tail.push(text);
    }
    let exit = running.await.context("the verify runner panicked")??;
    drop(lease);
    if exit != Exit::Cancelled {
        // Re-established here, the clean mark spares the next task in this slot (or the next
        // run, with a kept pool) from writing every file of the checkout again.
        let (c, limits) = (checkout.clone(), e.opts.limits.clone());
        match blocking(move || crate::git::commit::reclean(&c, tree, &limits)).await {
            Ok(clean) => tracing::debug!(clean, "checkout compared after the verify"),
            Err(err) => tracing::debug!("checkout not compared after the verify: {err:#}"),
        }
    }
    let took = t0.elapsed();
    let passed = exit == Exit::Code(0);
    if exit == Exit::Cancelled {
        writeln!(log, "--- verify interrupted")?;
        return Ok(Verdict {
            passed: false,
            failure: None,
            cancelled: true,
        });
    }
    let failure = (!passed).then(|| describe_failure(settings, exit, took, &tail.text()));
    writeln!(
        log,
        "--- verify {}: {exit:?} after {:.1}s",
        if passed { "passed" } else { "failed" },
        took.as_secs_f64()
    )?;
    let row = VerifyRow {
        idx: which.idx,
        attempt: which.attempt,
        round: which.round,
        kind: which.kind,
        tree: tree.to_string(),
        commit: commit.to_string(),
        passed,
        exit_code: exit.code(),
        duration_ms: took.as_millis() as u64,
        failure: failure.clone(),
        at: String::new(),
    };
    e.state()?.add_verify(run_id, &row)?;
    Ok(Verdict {
        passed,
        failure,
        cancelled: false,
    })
}

fn describe_failure(settings: &VerifySettings, exit: Exit, took: Duration, tail: &str) -> String {
    let how = match exit {
        Exit::Code(c) => format!("exited with code {c}"),
        Exit::Signal(s) => format!("was killed by signal {s}"),
        Exit::TimedOut(d) => format!("timed out after {} ([verify] timeout)", humantime::format_duration(d)),
        Exit::Cancelled => "was interrupted".into(),
    };
    format!(
        "The verify command `{}` {how} after {:.1}s. The end of its output:\n{tail}",
        settings.describe(),
        took.as_secs_f64()
    )
}

/// The last [`TAIL_BYTES`] of the output, ANSI stripped.
#[derive(Default)]
struct Tail {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
}

impl Tail {
    fn push(&mut self, line: &str) {
        let clean = strip_ansi(line);
        self.bytes += clean.len() + 1;
        self.lines.push_back(clean);
        while self.bytes > TAIL_BYTES && self.lines.len() > 1 {
            if let Some(old) = self.lines.pop_front() {
                self.bytes -= old.len() + 1;
            }
        }
    }

    fn text(&self) -> String {
        let all: Vec<&str> = self.lines.iter().map(String::as_str).collect();
        let all = all.join("\n");
        if all.len() <= TAIL_BYTES {
            return all;
        }
        // One line longer than the whole tail: keep its end, on a character boundary.
        let mut cut = all.len() - TAIL_BYTES;
        while !all.is_char_boundary(cut) {
            cut += 1;
        }
        all[cut..].to_string()
    }
}

/// Removes ANSI escape sequences (CSI `ESC [ … final`, OSC `ESC ] … BEL|ST`, two-byte
/// escapes) and other control characters but tab.
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => match chars.next() {
                Some('[') => {
                    for n in chars.by_ref() {
                        if ('\x40'..='\x7e').contains(&n) {
                            break;
                        }
                    }
                }
                Some(']') => {
                    while let Some(n) = chars.next() {
                        if n == '\x07' || (n == '\x1b' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                _ => {}
            },
            '\t' => out.push(c),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_controls_go() {
        assert_eq!(strip_ansi("\x1b[1;31merror\x1b[0m: x\r"), "error: x");
        assert_eq!(strip_ansi("\x1b]8;;http://x\x07link\x1b]8;;\x1b\\ end"), "link end");
        assert_eq!(strip_ansi("a\tb\x08c"), "a\tbc");
    }

    #[test]
    fn the_tail_keeps_the_last_16_kib() {
        let mut t = Tail::default();
        for i in 0..10_000 {
            t.push(&format!("\x1b[32mline {i}\x1b[0m"));
        }
        let text = t.text();
        assert!(text.len() <= TAIL_BYTES);
        assert!(text.ends_with("line 9999"));
        assert!(!text.contains("line 10\n") && !text.contains('\x1b'));
        let mut one = Tail::default();
        one.push(&"é".repeat(20_000));
        assert!(one.text().len() <= TAIL_BYTES && one.text().starts_with('é'));
    }
}
