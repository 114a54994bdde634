//! The Codex CLI's side of the wire, without running anything: typed
//! `codex exec --json` events, a run summary built from them, a one-line "last
//! action" for progress lines, and the private `CODEX_HOME/config.toml`.
//!
//! Facts checked against codex-cli 0.169.0 (captures in `fixtures/codex/`):
//! - stdout is JSONL, one event per line, each with a `type`;
//! - an `item.*` whose item type is `error` is a warning (e.g. "Model metadata
//!   for `x` not found"), not a failure: a run with one still exits 0;
//! - a failed run prints a top-level `error` then `turn.failed`, and exits 1;
//! - a command that exits non-zero is `command_execution` with `status:
//!   "failed"`, which does not fail the turn;
//! - edits made through `apply_patch` come as `file_change` items with
//!   absolute paths; edits made by shell commands show only as commands;
//! - `turn.completed.usage` is the sum over the turn's model responses.
//!
//! Unknown event and item types are kept as `Other` so newer codex versions
//! degrade to "no detail" instead of a parse failure.

use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(default)]
pub struct Usage {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_output_tokens: u64,
}

impl Usage {
    /// Input plus output tokens (cached and reasoning tokens are already
    /// counted inside those two).
    pub fn total(&self) -> u64 {
        self.input_tokens + self.output_tokens
    }

    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.cached_input_tokens += other.cached_input_tokens;
        self.cache_write_input_tokens += other.cache_write_input_tokens;
        self.output_tokens += other.output_tokens;
        self.reasoning_output_tokens += other.reasoning_output_tokens;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Started,
    Updated,
    Completed,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChange {
    pub path: String,
    /// `add`, `update` or `delete`.
    pub kind: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    AgentMessage {
        text: String,
    },
    Reasoning {
        text: String,
    },
    CommandExecution {
        command: String,
        aggregated_output: String,
        exit_code: Option<i64>,
        /// `in_progress`, `completed`, `failed`, `declined`.
        status: String,
    },
    FileChange {
        changes: Vec<FileChange>,
        status: String,
    },
    /// A warning shown by codex; it does not fail the run.
    Error {
        message: String,
    },
    Other {
        kind: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodexEvent {
    ThreadStarted {
        thread_id: String,
    },
    TurnStarted,
    TurnCompleted {
        usage: Usage,
    },
    TurnFailed {
        message: String,
    },
    /// A fatal error of the run (stream failure, bad config, HTTP error).
    Error {
        message: String,
    },
    Item {
        phase: Phase,
        id: String,
        item: Item,
    },
    Other {
        kind: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("codex printed a line that is not JSON: {0}")]
    NotJson(String),
    #[error("codex printed an event without a `type`: {0}")]
    NoType(String),
}

fn text(v: &Value, key: &str) -> String {
    v.get(key).and_then(Value::as_str).unwrap_or_default().to_string()
}

/// Parses one stdout line. Blank lines give `Ok(None)`.
pub fn parse_line(line: &str) -> Result<Option<CodexEvent>, EventError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    let short = || line.chars().take(200).collect::<String>();
    let v: Value = serde_json::from_str(line).map_err(|_| EventError::NotJson(short()))?;
    let kind = v
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| EventError::NoType(short()))?;
    let event = match kind {
        "thread.started" => CodexEvent::ThreadStarted {
            thread_id: text(&v, "thread_id"),
        },
        "turn.started" => CodexEvent::TurnStarted,
        "turn.completed" => CodexEvent::TurnCompleted {
            usage: v
                .get("usage")
                .and_then(|u| serde_json::from_value(u.clone()).ok())
                .unwrap_or_default(),
        },
        "turn.failed" => CodexEvent::TurnFailed {
            message: v.get("error").map(|e| text(e, "message")).unwrap_or_default(),
        },
        "error" => CodexEvent::Error {
            message: text(&v, "message"),
        },
        "item.started" | "item.updated" | "item.completed" => {
            let phase = match kind {
                "item.started" => Phase::Started,
                "item.updated" => Phase::Updated,
                _ => Phase::Completed,
            };
            let raw = v.get("item").cloned().unwrap_or(Value::Null);
            CodexEvent::Item {
                phase,
                id: text(&raw, "id"),
                item: parse_item(&raw),
            }
        }
        other => CodexEvent::Other {
            kind: other.to_string(),
        },
    };
    Ok(Some(event))
}

fn parse_item(v: &Value) -> Item {
    match v.get("type").and_then(Value::as_str).unwrap_or_default() {
        "agent_message" => Item::AgentMessage { text: text(v, "text") },
        "reasoning" => Item::Reasoning { text: text(v, "text") },
        "command_execution" => Item::CommandExecution {
            command: text(v, "command"),
            aggregated_output: text(v, "aggregated_output"),
            exit_code: v.get("exit_code").and_then(Value::as_i64),
            status: text(v, "status"),
        },
        "file_change" => Item::FileChange {
            changes: v
                .get("changes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| FileChange {
                    path: text(c, "path"),
                    kind: text(c, "kind"),
                })
                .collect(),
            status: text(v, "status"),
        },
        "error" => Item::Error {
            message: text(v, "message"),
        },
        other => Item::Other {
            kind: other.to_string(),
        },
    }
}

impl CodexEvent {
    /// True for the events that fail an attempt (`turn.failed`, top-level
    /// `error`). Error *items* are warnings and do not count.
    pub fn is_failure(&self) -> bool {
        matches!(self, CodexEvent::TurnFailed { .. } | CodexEvent::Error { .. })
    }

    /// A short single-line description for a progress line, or None for
    /// events that say nothing new (updates, unknown kinds).
    pub fn last_action(&self) -> Option<String> {
        let s = match self {
            CodexEvent::ThreadStarted { .. } => "started".to_string(),
            CodexEvent::TurnStarted => "thinking".to_string(),
            CodexEvent::TurnCompleted { usage } => format!("done, {} tokens", usage.total()),
            CodexEvent::TurnFailed { message } => format!("failed: {message}"),
            CodexEvent::Error { message } => format!("error: {message}"),
            CodexEvent::Item {
                phase: Phase::Updated, ..
            }
            | CodexEvent::Other { .. } => return None,
            CodexEvent::Item { phase, item, .. } => match (phase, item) {
                (Phase::Started, Item::CommandExecution { command, .. }) => {
                    format!("running {}", display_command(command))
                }
                (_, Item::CommandExecution { command, exit_code, .. }) => match exit_code {
                    Some(0) | None => format!("ran {}", display_command(command)),
                    Some(code) => format!("ran {} (exit {code})", display_command(command)),
                },
                (Phase::Started, Item::FileChange { changes, .. }) => {
                    format!("editing {}", file_list(changes))
                }
                (_, Item::FileChange { changes, .. }) => format!("edited {}", file_list(changes)),
                (_, Item::AgentMessage { text }) => format!("said: {text}"),
                (_, Item::Reasoning { .. }) => "thinking".to_string(),
                (_, Item::Error { message }) => format!("warning: {message}"),
                (_, Item::Other { kind }) => kind.replace('_', " "),
            },
        };
        Some(one_line(&s, 100))
    }
}

/// The command codex ran without its `/bin/bash -lc '...'` wrapper.
pub fn display_command(command: &str) -> String {
    let inner = ["/bin/bash -lc ", "bash -lc ", "/bin/sh -c ", "sh -c "]
        .iter()
        .find_map(|p| command.strip_prefix(p))
        .unwrap_or(command)
        .trim();
    let unquoted = if inner.len() >= 2
        && ((inner.starts_with('\'') && inner.ends_with('\'')) || (inner.starts_with('"') && inner.ends_with('"')))
    {
        &inner[1..inner.len() - 1]
    } else {
        inner
    };
    unquoted.to_string()
}

/// File names only (the directories are the checkout's, long and the same).
fn file_list(changes: &[FileChange]) -> String {
    let names: Vec<&str> = changes
        .iter()
        .map(|c| c.path.rsplit('/').next().unwrap_or(&c.path))
        .collect();
    names.join(", ")
}

/// First line only, at most `max` characters, with an ellipsis when cut.
pub fn one_line(s: &str, max: usize) -> String {
    let first = s.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
    let multi = s.trim().lines().count() > 1;
    let mut out: String = first.chars().take(max).collect();
    if multi || first.chars().count() > max {
        out.push('…');
    }
    out
}

/// A command run, as recorded in the state DB.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandRun {
    pub command: String,
    pub exit_code: Option<i64>,
    pub status: String,
}

/// What one `codex exec` run did, folded from its events.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    pub thread_id: Option<String>,
    pub commands: Vec<CommandRun>,
    /// Paths in first-seen order, each once.
    pub files_changed: Vec<String>,
    /// Fatal errors (`error`, `turn.failed`), in order.
    pub errors: Vec<String>,
    /// Error items: codex's warnings.
    pub warnings: Vec<String>,
    /// Summed over `turn.completed` events.
    pub usage: Usage,
    pub turns_completed: u32,
    /// The text of the last agent message.
    pub final_message: Option<String>,
    pub last_action: Option<String>,
}

impl RunSummary {
    pub fn apply(&mut self, event: &CodexEvent) {
        if let Some(a) = event.last_action() {
            self.last_action = Some(a);
        }
        match event {
            CodexEvent::ThreadStarted { thread_id } => self.thread_id = Some(thread_id.clone()),
            CodexEvent::TurnCompleted { usage } => {
                self.usage.add(usage);
                self.turns_completed += 1;
            }
            // codex prints the same message as `error` and then `turn.failed`.
            CodexEvent::TurnFailed { message } | CodexEvent::Error { message }
                if self.errors.last() != Some(message) =>
            {
                self.errors.push(message.clone());
            }
            CodexEvent::Item {
                phase: Phase::Completed,
                item,
                ..
            } => match item {
                Item::CommandExecution {
                    command,
                    exit_code,
                    status,
                    ..
                } => self.commands.push(CommandRun {
                    command: display_command(command),
                    exit_code: *exit_code,
                    status: status.clone(),
                }),
                Item::FileChange { changes, .. } => {
                    for c in changes {
                        if !self.files_changed.contains(&c.path) {
                            self.files_changed.push(c.path.clone());
                        }
                    }
                }
                Item::AgentMessage { text } => self.final_message = Some(text.clone()),
                Item::Error { message } => self.warnings.push(message.clone()),
                _ => {}
            },
            _ => {}
        }
    }

    /// The reason the run failed, if an event said so.
    pub fn failure(&self) -> Option<&str> {
        self.errors.last().map(String::as_str)
    }
}

/// The name of the provider in the rendered config.
pub const PROVIDER: &str = "cohort";
pub const OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// Renders `CODEX_HOME/config.toml`: `model` through one custom provider at
/// `base_url` (OpenAI when None) that reads its key from the environment
/// variable `env_key`, speaks the Responses API, and never retries (cohort's
/// attempts do that). No MCP servers: a private CODEX_HOME has none unless
/// this file names them. The key itself never goes in this file.
pub fn render_config(model: &str, base_url: Option<&str>, env_key: &str) -> String {
    let base = base_url.unwrap_or(OPENAI_BASE_URL).trim_end_matches('/');
    format!(
        "# Written by cohort for one codex run; do not edit.\n\
         model = {model}\n\
         model_provider = {provider}\n\
         \n\
         [model_providers.{PROVIDER}]\n\
         name = {provider}\n\
         base_url = {base}\n\
         env_key = {env_key}\n\
         wire_api = \"responses\"\n\
         request_max_retries = 0\n\
         stream_max_retries = 0\n",
        model = toml_string(model),
        provider = toml_string(PROVIDER),
        base = toml_string(base),
        env_key = toml_string(env_key),
    )
}

/// A TOML basic string: quotes, backslashes and control characters escaped.
fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every event of a capture made with the real codex 0.169.0 (see
    /// `fixtures/codex/capture.sh`), folded into a summary.
    fn run(capture: &str) -> (Vec<CodexEvent>, RunSummary) {
        let mut events = Vec::new();
        let mut summary = RunSummary::default();
        for line in capture.lines() {
            let e = parse_line(line).unwrap().unwrap();
            summary.apply(&e);
            events.push(e);
        }
        (events, summary)
    }

    #[test]
    fn a_successful_edit() {
        let (events, s) = run(include_str!("../../fixtures/codex/edit.jsonl"));
        assert!(matches!(events[0], CodexEvent::ThreadStarted { .. }));
        assert!(s.thread_id.as_deref().is_some_and(|t| t.len() > 10));
        assert_eq!(s.commands.len(), 1);
        assert!(s.commands[0].command.starts_with("printf '%s"), "{:?}", s.commands);
        assert_eq!(s.commands[0].exit_code, Some(0));
        assert!(s
            .final_message
            .as_deref()
            .unwrap()
            .starts_with("Done: wrote task-add-a-greeting-file-"));
        let want = Usage {
            input_tokens: 2200,
            cached_input_tokens: 1200,
            cache_write_input_tokens: 0,
            output_tokens: 75,
            reasoning_output_tokens: 10,
        };
        assert_eq!(s.usage, want);
        assert_eq!(s.turns_completed, 1);
        // The unknown-model notice is an error *item*: a warning, not a failure.
        assert_eq!(s.warnings.len(), 1);
        assert!(s.warnings[0].contains("Model metadata"));
        assert!(!events.iter().any(CodexEvent::is_failure));
        assert_eq!(s.failure(), None);
        assert_eq!(s.last_action.as_deref(), Some("done, 2275 tokens"));
    }

    #[test]
    fn apply_patch_gives_file_changes() {
        let (events, s) = run(include_str!("../../fixtures/codex/patch.jsonl"));
        assert_eq!(s.files_changed.len(), 2);
        assert!(s.files_changed[0].ends_with("/repo/README"));
        assert!(s.files_changed[1].ends_with("/repo/notes.md"));
        assert!(s.commands.is_empty());
        let actions: Vec<String> = events.iter().filter_map(CodexEvent::last_action).collect();
        assert!(actions.contains(&"editing README, notes.md".to_string()), "{actions:?}");
        assert!(actions.contains(&"edited README, notes.md".to_string()), "{actions:?}");
    }

    #[test]
    fn a_failing_command_does_not_fail_the_turn() {
        let (_, s) = run(include_str!("../../fixtures/codex/command-fails.jsonl"));
        assert_eq!(s.commands[0].exit_code, Some(2));
        assert_eq!(s.commands[0].status, "failed");
        assert_eq!(s.commands[0].command, "ls /nonexistent-dir");
        assert_eq!(s.failure(), None);
        assert_eq!(s.turns_completed, 1);
    }

    #[test]
    fn failures_from_the_model_api() {
        for (capture, needle) in [
            (
                include_str!("../../fixtures/codex/response-failed.jsonl"),
                "scripted failure",
            ),
            (
                include_str!("../../fixtures/codex/malformed.jsonl"),
                "stream closed before response.completed",
            ),
            (include_str!("../../fixtures/codex/rate-limited.jsonl"), "429"),
        ] {
            let (events, s) = run(capture);
            assert!(events.iter().any(CodexEvent::is_failure));
            assert!(s.failure().unwrap().contains(needle), "{:?}", s.errors);
            assert_eq!(s.errors.len(), 1, "error and turn.failed carry one message");
            assert_eq!(s.turns_completed, 0);
            assert!(s.last_action.unwrap().starts_with("failed: "));
        }
    }

    #[test]
    fn odd_lines() {
        assert_eq!(parse_line("  ").unwrap(), None);
        assert!(matches!(parse_line("Reading prompt"), Err(EventError::NotJson(_))));
        assert!(matches!(parse_line("{\"x\":1}"), Err(EventError::NoType(_))));
        let e = parse_line(r#"{"type":"item.completed","item":{"id":"i","type":"todo_list","items":[]}}"#);
        let e = e.unwrap().unwrap();
        assert_eq!(
            e,
            CodexEvent::Item {
                phase: Phase::Completed,
                id: "i".into(),
                item: Item::Other {
                    kind: "todo_list".into()
                }
            }
        );
        assert_eq!(e.last_action().as_deref(), Some("todo list"));
        let e = parse_line(r#"{"type":"future.thing"}"#).unwrap().unwrap();
        assert_eq!(
            e,
            CodexEvent::Other {
                kind: "future.thing".into()
            }
        );
        assert_eq!(e.last_action(), None);
    }

    #[test]
    fn commands_and_lines_are_shortened_for_display() {
        assert_eq!(display_command("/bin/bash -lc 'cargo test'"), "cargo test");
        assert_eq!(display_command("/bin/bash -lc \"echo 'x'\""), "echo 'x'");
        assert_eq!(display_command("git status"), "git status");
        assert_eq!(one_line("said: a\nb", 100), "said: a…");
        assert_eq!(one_line(&"x".repeat(5), 3), "xxx…");
        let msg = CodexEvent::Item {
            phase: Phase::Completed,
            id: "1".into(),
            item: Item::AgentMessage {
                text: "All done.\nDetails".into(),
            },
        };
        assert_eq!(msg.last_action().as_deref(), Some("said: All done.…"));
    }

    #[test]
    fn config_names_one_custom_provider_and_escapes_values() {
        let t: toml::Table = toml::from_str(&render_config(
            "gpt-5-codex",
            Some("http://127.0.0.1:9/v1/"),
            "COHORT_KEY",
        ))
        .unwrap();
        assert_eq!(t["model"].as_str(), Some("gpt-5-codex"));
        assert_eq!(t["model_provider"].as_str(), Some(PROVIDER));
        let p = &t["model_providers"][PROVIDER];
        assert_eq!(p["base_url"].as_str(), Some("http://127.0.0.1:9/v1"));
        assert_eq!(p["env_key"].as_str(), Some("COHORT_KEY"));
        assert_eq!(p["wire_api"].as_str(), Some("responses"));
        assert_eq!(p["request_max_retries"].as_integer(), Some(0));
        assert_eq!(p["stream_max_retries"].as_integer(), Some(0));
        assert!(!t.contains_key("mcp_servers"));
        let t: toml::Table = toml::from_str(&render_config("we\"ird\\\nmodel", None, "K")).unwrap();
        assert_eq!(t["model"].as_str(), Some("we\"ird\\\nmodel"));
        assert_eq!(
            t["model_providers"][PROVIDER]["base_url"].as_str(),
            Some(OPENAI_BASE_URL)
        );
    }
}
