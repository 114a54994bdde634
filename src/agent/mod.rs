//! What runs for a task: an agent turns a task into a program invocation and
//! reads that program's output. Where it runs is the runtime's business.

pub mod codex;
pub mod codex_events;
pub mod command;

use std::path::PathBuf;

use anyhow::Result;
use serde::Serialize;

use crate::secret::Secret;

/// Everything an agent may use to build its invocation.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub run_id: String,
    pub index: usize,
    pub task: String,
    /// The prompt (template with the task filled in).
    pub prompt: String,
    /// The prompt, as a file outside the checkout (never committed).
    pub prompt_file: PathBuf,
    /// The checkout the agent works in (as the runtime will see it).
    pub checkout: PathBuf,
    /// A private directory for this attempt, outside the checkout.
    pub scratch: PathBuf,
    pub attempt: u32,
    /// The model API as this agent reaches it: cohort's gateway, which holds the key.
    pub model: Option<ModelAccess>,
    /// The project's check failed on the agent's work: this round is to fix it.
    pub feedback: Option<Feedback>,
}

/// A failed verify handed back to the agent.
#[derive(Debug, Clone)]
pub struct Feedback {
    /// What the agent is told: the check failed, how, and the end of its output.
    pub message: String,
    /// The same, as a file outside the checkout (`COHORT_FEEDBACK_FILE` for command agents).
    pub file: PathBuf,
    /// The conversation to continue (codex's thread id), when the agent reported one.
    pub thread: Option<String>,
}

/// The gateway's address for one agent, and the per-task token it sends there (never the key).
#[derive(Clone)]
pub struct ModelAccess {
    /// `http://127.0.0.1:PORT/v1` as seen from where the agent runs.
    pub base_url: String,
    pub token: String,
}

impl std::fmt::Debug for ModelAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelAccess")
            .field("base_url", &self.base_url)
            .field("token", &"***")
            .finish()
    }
}

/// A program to start: argv without a shell, extra environment, and stdin.
#[derive(Debug, Clone, Default)]
pub struct Invocation {
    pub program: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Only ever placed in the child's environment.
    pub secret_env: Vec<(String, Secret)>,
    pub stdin: Option<Vec<u8>>,
}

/// What the agent reported, as far as cohort understands it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentEvent {
    Thread {
        id: String,
    },
    Command {
        command: String,
        exit_code: Option<i32>,
    },
    FileChange {
        paths: Vec<String>,
    },
    Message {
        text: String,
    },
    Usage {
        input_tokens: u64,
        cached_input_tokens: u64,
        output_tokens: u64,
    },
    Error {
        message: String,
    },
    Failed {
        message: String,
    },
}

impl AgentEvent {
    /// One short line for a progress display.
    pub fn summary(&self) -> String {
        let s = match self {
            AgentEvent::Thread { id } => format!("thread {id}"),
            AgentEvent::Command { command, .. } => format!("$ {command}"),
            AgentEvent::FileChange { paths } => format!("edited {}", paths.join(", ")),
            AgentEvent::Message { text } => text.clone(),
            AgentEvent::Usage {
                input_tokens,
                output_tokens,
                ..
            } => format!("tokens in {input_tokens} out {output_tokens}"),
            AgentEvent::Error { message } | AgentEvent::Failed { message } => {
                format!("error: {message}")
            }
        };
        let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
        one_line.chars().take(100).collect()
    }
}

#[async_trait::async_trait]
pub trait Agent: Send + Sync {
    fn name(&self) -> &'static str;
    /// What runs, for logs (e.g. the model and endpoint).
    fn describe(&self) -> String {
        self.name().to_string()
    }
    /// Checks made once before the first task, to fail fast.
    async fn preflight(&self) -> Result<()> {
        Ok(())
    }
    fn invocation(&self, ctx: &TaskContext) -> Result<Invocation>;
    /// Parses one line of the agent's standard output.
    fn parse_line(&self, _line: &str) -> Option<AgentEvent> {
        None
    }
    /// Why an attempt that exited with `code` failed, if it did, judging by
    /// the exit code and the events seen.
    fn failure(&self, code: i32, events: &[AgentEvent]) -> Option<String> {
        if let Some(AgentEvent::Failed { message }) = events.iter().find(|e| matches!(e, AgentEvent::Failed { .. })) {
            return Some(message.clone());
        }
        (code != 0).then(|| format!("the agent exited with code {code}"))
    }
}
