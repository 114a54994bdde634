//! The Codex CLI as the agent: `codex exec --json`, one private CODEX_HOME
//! per attempt, the prompt on stdin. In a run it talks to cohort's model gateway with a
//! per-task token and never holds the key; only a codex started without a gateway gets the
//! key, in its own environment alone.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::codex_events::{self as events, CodexEvent, Item, Phase};
use super::{Agent, AgentEvent, Feedback, Invocation, TaskContext};
use crate::secret::Secret;

/// The variable the rendered provider config reads the key from. Not
/// `OPENAI_API_KEY`, so the key reaches codex only through this one path.
pub const KEY_ENV: &str = "COHORT_CODEX_KEY";

pub struct CodexAgent {
    pub codex: PathBuf,
    pub model: String,
    pub base_url: Option<String>,
    pub key: Secret,
    /// `workspace-write` on the host; in a container the container is the
    /// sandbox and codex's own one often cannot start there.
    pub sandbox: &'static str,
}

/// Finds codex: `[agent] codex_path`, then `codex` on PATH, then the
/// project-local install made by fixtures/install-codex.sh.
pub fn find_codex(configured: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = configured {
        anyhow::ensure!(p.is_file(), "[agent] codex_path {} does not exist", p.display());
        return Ok(p.to_path_buf());
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("codex");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    anyhow::bail!(
        "codex is not installed: run `npm install -g @openai/codex@0.169.0` (or fixtures/install-codex.sh), \
         or set [agent] codex_path in cohort.toml"
    )
}

#[async_trait::async_trait]
impl Agent for CodexAgent {
    fn name(&self) -> &'static str {
        "codex"
    }

    fn describe(&self) -> String {
        let base = self.base_url.as_deref().unwrap_or(events::OPENAI_BASE_URL);
        format!("codex at {}, model {} via {base}", self.codex.display(), self.model)
    }

    async fn preflight(&self) -> Result<()> {
        Ok(crate::models::check_model(&self.model, self.base_url.as_deref(), &self.key).await?)
    }

    fn invocation(&self, ctx: &TaskContext) -> Result<Invocation> {
        let home = ctx.scratch.join("codex-home");
        std::fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
        let base_url = match &ctx.model {
            Some(m) => Some(m.base_url.as_str()),
            None => self.base_url.as_deref(),
        };
        let config = events::render_config(&self.model, base_url, KEY_ENV);
        std::fs::write(home.join("config.toml"), config)?;
        let last = ctx.scratch.join("last-message.txt");
        let (args, prompt) = match &ctx.feedback {
            // The same conversation goes on, told what failed: `codex exec resume` (it has no
            // -C or --sandbox; the runtime starts it in the checkout, the sandbox is config).
            Some(Feedback {
                message,
                thread: Some(thread),
                ..
            }) => (
                vec![
                    "exec".into(),
                    "resume".into(),
                    "--json".into(),
                    "--skip-git-repo-check".into(),
                    "-c".into(),
                    format!("sandbox_mode=\"{}\"", self.sandbox),
                    "-o".into(),
                    last.display().to_string(),
                    thread.clone(),
                    "-".into(),
                ],
                message.clone(),
            ),
            feedback => {
                let mut prompt = ctx.prompt.clone();
                if let Some(f) = feedback {
                    prompt.push_str("\n\n");
                    prompt.push_str(&f.message);
                }
                let args = vec![
                    "exec".into(),
                    "--json".into(),
                    "-C".into(),
                    ctx.checkout.display().to_string(),
                    "--sandbox".into(),
                    self.sandbox.into(),
                    "--skip-git-repo-check".into(),
                    "-o".into(),
                    last.display().to_string(),
                    "-".into(),
                ];
                (args, prompt)
            }
        };
        let mut env = vec![("CODEX_HOME".into(), home.display().to_string())];
        let secret_env = match &ctx.model {
            // The token is not the key: it dies with the task.
            Some(m) => {
                env.push((KEY_ENV.into(), m.token.clone()));
                Vec::new()
            }
            None => vec![(KEY_ENV.into(), self.key.clone())],
        };
        Ok(Invocation {
            program: self.codex.display().to_string(),
            args,
            env,
            secret_env,
            stdin: Some(prompt.into_bytes()),
        })
    }

    /// codex prints the reason as an `error` event before `turn.failed`;
    /// show that rather than a bare exit code.
    fn failure(&self, code: i32, events: &[AgentEvent]) -> Option<String> {
        let reason = events.iter().rev().find_map(|e| match e {
            AgentEvent::Failed { message } => Some(message.clone()),
            AgentEvent::Error { message } if !message.starts_with("warning:") => Some(message.clone()),
            _ => None,
        });
        match (code, reason) {
            (0, None) => None,
            (0, Some(r)) if events.iter().any(|e| matches!(e, AgentEvent::Failed { .. })) => Some(r),
            (0, Some(_)) => None,
            (c, Some(r)) => Some(format!("codex exited with code {c}: {r}")),
            (c, None) => Some(format!("codex exited with code {c}")),
        }
    }

    fn parse_line(&self, line: &str) -> Option<AgentEvent> {
        let event = events::parse_line(line).ok()??;
        Some(match event {
            CodexEvent::ThreadStarted { thread_id } => AgentEvent::Thread { id: thread_id },
            CodexEvent::TurnCompleted { usage } => AgentEvent::Usage {
                input_tokens: usage.input_tokens,
                cached_input_tokens: usage.cached_input_tokens,
                output_tokens: usage.output_tokens,
            },
            CodexEvent::TurnFailed { message } => AgentEvent::Failed { message },
            CodexEvent::Error { message } => AgentEvent::Error { message },
            CodexEvent::Item {
                phase: Phase::Completed,
                item,
                ..
            } => match item {
                Item::CommandExecution { command, exit_code, .. } => AgentEvent::Command {
                    command: events::display_command(&command),
                    exit_code: exit_code.map(|c| c as i32),
                },
                Item::FileChange { changes, .. } => AgentEvent::FileChange {
                    paths: changes.into_iter().map(|c| c.path).collect(),
                },
                Item::AgentMessage { text } => AgentEvent::Message { text },
                Item::Error { message } => AgentEvent::Error {
                    message: format!("warning: {message}"),
                },
                _ => return None,
            },
            _ => return None,
        })
    }
}
