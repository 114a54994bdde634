//! Where `cohort serve` logs: the journal, with structured fields (RUN_ID, TASK_ID,
//! REQUEST...) when systemd gave us one, else stderr; and always `STATE/serve.log`, which
//! `cohort service logs` reads (no journalctl needed).

use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

pub fn init(state_dir: Option<&Path>) {
    let filter = || EnvFilter::try_from_env("COHORT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let file = state_dir.and_then(|d| {
        std::fs::create_dir_all(d).ok()?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("serve.log"))
            .ok()
    });
    let file_layer = file.map(|f| {
        tracing_subscriber::fmt::layer()
            .with_ansi(false)
            .with_writer(Mutex::new(f))
            .with_filter(filter())
    });
    // JOURNAL_STREAM says our stderr is the journal: then write to it natively instead.
    let journald = std::env::var_os("JOURNAL_STREAM")
        .and_then(|_| tracing_journald::layer().ok())
        // No field prefix: the journal gets RUN_ID and TASK_ID, not F_RUN_ID.
        .map(|l| {
            l.with_syslog_identifier("cohort".into())
                .with_field_prefix(None)
                .with_filter(filter())
        });
    let stderr = journald.is_none().then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_filter(filter())
    });
    tracing_subscriber::registry()
        .with(file_layer)
        .with(journald)
        .with(stderr)
        .init();
}
