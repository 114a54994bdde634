//! Progress output: live bars on a terminal, timestamped lines otherwise, or — for the
//! service (`cohort serve`) — tracing events carrying `run_id` and `task_id`, which the
//! journal keeps as the structured fields RUN_ID and TASK_ID.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

static EVENTS: AtomicBool = AtomicBool::new(false);

/// From now on, progress goes out as tracing events instead of lines on stderr.
pub fn use_events() {
    EVENTS.store(true, Ordering::SeqCst);
}

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Progress {
    bars: Option<Bars>,
    run_id: String,
    events: bool,
}

struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    tasks: Mutex<HashMap<usize, ProgressBar>>,
}

fn stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

fn clip(s: &str, n: usize) -> String {
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s
    }
}

/// A line outside any run's display: on stderr, timestamped unless stderr
/// is a terminal (as the run's own lines are), or an event for the service.
pub fn say(msg: &str) {
    if EVENTS.load(Ordering::SeqCst) {
        tracing::info!("{msg}");
    } else if std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    } else {
        eprintln!("{} {msg}", stamp());
    }
}

impl Progress {
    /// Bars when stderr is a terminal, plain lines otherwise (or events, see [`use_events`]).
    pub fn new(total: usize, run_id: &str) -> Progress {
        let events = EVENTS.load(Ordering::SeqCst);
        if events || !std::io::stderr().is_terminal() {
            return Progress {
                bars: None,
                run_id: run_id.into(),
                events,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} tasks done {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        overall.enable_steady_tick(Duration::from_millis(250));
        Progress {
            bars: Some(Bars {
                multi,
                overall,
                tasks: Mutex::new(HashMap::new()),
            }),
            run_id: run_id.into(),
            events: false,
        }
    }

    /// A line that is not about one task.
    pub fn note(&self, msg: &str) {
        if self.events {
            tracing::info!(run_id = %self.run_id, "{msg}");
            return;
        }
        match &self.bars {
            Some(b) => b.multi.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{} {msg}", stamp()),
        }
    }

    pub fn task_started(&self, idx: usize, task: &str, attempt: u32) {
        let again = if attempt > 1 {
            format!(" (attempt {attempt})")
        } else {
            String::new()
        };
        if self.events {
            tracing::info!(run_id = %self.run_id, task_id = idx, attempt, "task {idx:03} started{again}: {}", clip(task, 100));
            return;
        }
        match &self.bars {
            Some(b) => {
                let bar = b.multi.insert_before(&b.overall, ProgressBar::new_spinner());
                bar.set_style(ProgressStyle::with_template("{spinner} {prefix} {msg}").expect("valid template"));
                bar.set_prefix(format!("task {idx:03}{again}"));
                bar.set_message(clip(task, 60));
                bar.enable_steady_tick(Duration::from_millis(200));
                b.tasks.lock().unwrap().insert(idx, bar);
                b.multi
                    .suspend(|| eprintln!("{} task {idx:03} started{again}: {}", stamp(), clip(task, 100)));
            }
            None => eprintln!("{} task {idx:03} started{again}: {}", stamp(), clip(task, 100)),
        }
    }

    /// The agent's last action, shown on the task's line.
    pub fn task_action(&self, idx: usize, action: &str) {
        if let Some(b) = &self.bars {
            if let Some(bar) = b.tasks.lock().unwrap().get(&idx) {
                bar.set_message(clip(action, 70));
            }
        }
    }

    /// A task's end. `detail` (its failure reason) goes out whole to the journal, serve.log
    /// and plain lines; only the live terminal display shortens it to one line.
    pub fn task_finished(&self, idx: usize, status: &str, detail: &str) {
        let line = |detail: String| {
            if detail.is_empty() {
                status.to_string()
            } else {
                format!("{status}: {detail}")
            }
        };
        if self.events {
            let line = line(detail.to_string());
            tracing::info!(run_id = %self.run_id, task_id = idx, status, "task {idx:03} {line}");
            return;
        }
        match &self.bars {
            Some(b) => {
                if let Some(bar) = b.tasks.lock().unwrap().remove(&idx) {
                    bar.finish_and_clear();
                    b.multi.remove(&bar);
                }
                let line = line(clip(detail, 120));
                b.multi.suspend(|| eprintln!("{} task {idx:03} {line}", stamp()));
            }
            None => eprintln!("{} task {idx:03} {}", stamp(), line(detail.to_string())),
        }
    }

    /// One more task reached a final state.
    pub fn advance(&self) {
        if let Some(b) = &self.bars {
            b.overall.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bars {
            b.overall.finish_and_clear();
        }
    }
}
