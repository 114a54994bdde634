//! The model-backed planner: a request document -> `Plan` through any
//! OpenAI-compatible Chat Completions endpoint (OpenAI, ollama, vLLM,
//! llama.cpp), using async-openai.
//!
//! How it stays reliable with small models and odd servers:
//! - it asks for structured output (`response_format` `json_schema`) but also
//!   parses JSON out of plain content, for servers that ignore the schema;
//! - it validates every answer and retries once, telling the model what was
//!   wrong; a second bad answer is an error (nothing half-made is returned);
//! - long documents are planned in chunks (task generators truncate on big
//!   inputs) and merged in document order without duplicates;
//! - 429 and 5xx are retried with backoff honouring `Retry-After` by
//!   async-openai's built-in retry layer (3 retries); connect, per-request and
//!   total timeouts bound the wait;
//! - the key goes only into the `Authorization: Bearer` header; it is scrubbed
//!   from every error message this module produces.

use std::collections::HashSet;
use std::time::Duration;

use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, CreateChatCompletionRequestArgs, FinishReason, ResponseFormat,
    ResponseFormatJsonSchema,
};
use async_openai::Client;

use super::{check_template, Plan, PlanError};
use crate::secret::Secret;

pub const DEFAULT_MODEL: &str = "gpt-5-nano";
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

const SYSTEM_PROMPT: &str = "\
You turn a request document into a uniform backlog for coding agents.
Reply with a JSON object only: {\"tasks\": [string], \"template\": string}.
- tasks: one entry per independent piece of work the document asks for, in document order. \
Each is a single line of plain text that makes sense on its own. Skip items already done \
(checked boxes) and text that is not a task.
- template: the prompt a coding agent receives for every task. It must contain the \
placeholder {task} where the task text goes, and carry the context the document gives \
for all tasks (goal, constraints, conventions).";

#[derive(Debug, Clone)]
pub struct LlmPlanner {
    pub model: String,
    /// An OpenAI-compatible base URL ending in `/v1`; None: OpenAI itself.
    pub base_url: Option<String>,
    /// Sent only as `Authorization: Bearer`; None sends an empty key (local servers).
    pub key: Option<Secret>,
    /// The endpoint to name in messages when `base_url` is cohort's gateway in front of it.
    pub shown_base: Option<String>,
    pub connect_timeout: Duration,
    /// Per HTTP request (each retry gets its own).
    pub request_timeout: Duration,
    /// For the whole plan: every chunk, retry and backoff.
    pub total_timeout: Duration,
    /// Documents longer than this (in bytes) are planned in chunks of at most
    /// this size, cut between paragraphs or lines, never inside a line.
    pub chunk_chars: usize,
    /// Ask for `response_format` `json_schema`. Off for servers that reject it.
    pub structured_output: bool,
}

impl LlmPlanner {
    pub fn new(model: impl Into<String>) -> Self {
        LlmPlanner {
            model: model.into(),
            base_url: None,
            key: None,
            shown_base: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(120),
            total_timeout: Duration::from_secs(300),
            chunk_chars: 12_000,
            structured_output: true,
        }
    }

    /// Plans `document`, or fails with a message that names the fix.
    pub async fn plan(&self, document: &str) -> Result<Plan, PlanError> {
        if self.model.trim().is_empty() {
            return Err(PlanError::Model(
                "no model is configured; set [planner] model or pass --model".into(),
            ));
        }
        if self.base_url.is_none() && self.key.as_ref().is_none_or(Secret::is_empty) {
            return Err(PlanError::Model(
                "no API key for OpenAI: set OPENAI_API_KEY, or point --base-url at a local server".into(),
            ));
        }
        match tokio::time::timeout(self.total_timeout, self.plan_all(document)).await {
            Ok(result) => result,
            Err(_) => Err(PlanError::Model(format!(
                "no plan within the total timeout of {}s ({})",
                self.total_timeout.as_secs_f32(),
                self.endpoint()
            ))),
        }
    }

    pub(super) fn endpoint(&self) -> String {
        let base = self
            .shown_base
            .as_deref()
            .or(self.base_url.as_deref())
            .unwrap_or(DEFAULT_BASE_URL);
        format!("model `{}` at {}", self.model, base.trim_end_matches('/'))
    }

    pub(super) fn client(&self) -> Result<Client<OpenAIConfig>, PlanError> {
        let base = self.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL);
        let mut builder = reqwest::Client::builder()
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout);
        // A proxy from the environment must not capture a local server.
        let host = reqwest::Url::parse(base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string));
        if matches!(host.as_deref(), Some("127.0.0.1" | "localhost" | "[::1]" | "::1")) {
            builder = builder.no_proxy();
        }
        let http = builder
            .build()
            .map_err(|e| PlanError::Model(format!("cannot set up the HTTP client: {e}")))?;
        // Explicit key and base, so nothing is silently taken from the environment.
        let key = self.key.as_ref().map(Secret::expose).unwrap_or("");
        let config = OpenAIConfig::new()
            .with_api_base(base.trim_end_matches('/'))
            .with_api_key(key);
        Ok(Client::with_config(config).with_http_client(http))
    }

    async fn plan_all(&self, document: &str) -> Result<Plan, PlanError> {
        let client = self.client()?;
        let parts = chunks(document, self.chunk_chars);
        if parts.is_empty() {
            return Err(PlanError::NoTasks {
                path: "the document".into(),
            });
        }
        tracing::info!(chunks = parts.len(), "planning with {}", self.endpoint());
        let mut plans = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            plans.push(self.plan_chunk(&client, part, i, parts.len()).await?);
        }
        let plan = merge(plans);
        plan.validate()?;
        Ok(plan)
    }

    /// One chunk: ask, validate, and on a bad answer ask once more with the error.
    async fn plan_chunk(
        &self,
        client: &Client<OpenAIConfig>,
        chunk: &str,
        index: usize,
        count: usize,
    ) -> Result<Plan, PlanError> {
        let mut system = SYSTEM_PROMPT.to_string();
        if count > 1 {
            system.push_str(&format!(
                "\nThe document is long, so it comes in parts. This is part {} of {count}: \
                 list only the tasks in this part; an empty list is fine if it has none.",
                index + 1
            ));
        }
        // The document goes alone in the first user message; feedback follows it.
        let mut messages: Vec<ChatCompletionRequestMessage> = vec![
            ChatCompletionRequestSystemMessage::from(system).into(),
            ChatCompletionRequestUserMessage::from(chunk).into(),
        ];
        let mut problem = String::new();
        for attempt in 0..2 {
            let answer = match self.ask(client, &messages).await {
                Ok(answer) => answer,
                Err(Ask::Fatal(e)) => return Err(e),
                Err(Ask::Bad(p)) => {
                    // A body we cannot read: nothing to show the model, ask again as is.
                    problem = p;
                    continue;
                }
            };
            match parse_plan(&answer).and_then(|p| check(p, count > 1)) {
                Ok(plan) => return Ok(plan),
                Err(p) => {
                    tracing::warn!(attempt, "the model's plan was rejected: {p}");
                    problem = p;
                    if attempt == 0 {
                        messages.push(ChatCompletionRequestAssistantMessage::from(answer).into());
                        messages.push(ChatCompletionRequestUserMessage::from(feedback(&problem)).into());
                    }
                }
            }
        }
        Err(PlanError::Model(self.scrub(format!(
            "the plan from {} was still invalid after one retry: {problem}",
            self.endpoint()
        ))))
    }

    pub(super) async fn ask(
        &self,
        client: &Client<OpenAIConfig>,
        messages: &[ChatCompletionRequestMessage],
    ) -> Result<String, Ask> {
        let mut args = CreateChatCompletionRequestArgs::default();
        args.model(self.model.clone()).messages(messages.to_vec());
        if self.structured_output {
            args.response_format(ResponseFormat::JsonSchema {
                json_schema: ResponseFormatJsonSchema {
                    name: "plan".into(),
                    description: Some("A uniform task list and one prompt template".into()),
                    schema: plan_schema(),
                    strict: Some(true),
                },
            });
        }
        let request = args
            .build()
            .map_err(|e| Ask::Fatal(PlanError::Model(format!("cannot build the request: {e}"))))?;
        let response = client.chat().create(request).await.map_err(|e| self.classify(e))?;
        let Some(choice) = response.choices.into_iter().next() else {
            return Err(Ask::Bad("the answer had no choices".into()));
        };
        if let Some(refusal) = choice.message.refusal.filter(|r| !r.is_empty()) {
            return Err(Ask::Fatal(PlanError::Model(
                self.scrub(format!("the model refused: {refusal}")),
            )));
        }
        let content = choice.message.content.unwrap_or_default();
        if choice.finish_reason == Some(FinishReason::Length) {
            tracing::warn!("the model's answer was cut off at its length limit");
        }
        Ok(content)
    }

    /// Turns a client error into a message that says what to fix.
    fn classify(&self, e: OpenAIError) -> Ask {
        let at = self.endpoint();
        let msg = match e {
            OpenAIError::JSONDeserialize(err, _) => {
                return Ask::Bad(format!("the server's answer is not a valid chat completion: {err}"))
            }
            OpenAIError::ApiError(r) => {
                let status = r.status_code.as_u16();
                let hint = match status {
                    401 | 403 => "; check the API key (OPENAI_API_KEY)",
                    404 => "; check the model name and the base URL",
                    429 => "; rate limited even after retries, try again later",
                    500..=599 => "; the server failed even after retries",
                    _ => "",
                };
                let detail: String = r.api_error.message.chars().take(300).collect();
                format!("{at} answered HTTP {status}: {detail}{hint}")
            }
            OpenAIError::Reqwest(err) if err.is_timeout() => format!(
                "{at} did not answer within {}s (request timeout)",
                self.request_timeout.as_secs_f32()
            ),
            OpenAIError::Reqwest(err) if err.is_connect() => {
                format!("cannot connect to {at}: {}", error_chain(&err))
            }
            OpenAIError::Reqwest(err) => format!("request to {at} failed: {}", error_chain(&err)),
            other => format!("request to {at} failed: {other}"),
        };
        Ask::Fatal(PlanError::Model(self.scrub(msg)))
    }

    /// Removes the key from text that may have come from a server.
    pub(super) fn scrub(&self, text: String) -> String {
        match &self.key {
            Some(k) if !k.is_empty() => text.replace(k.expose(), "***"),
            _ => text,
        }
    }
}

pub(super) enum Ask {
    /// Transport, auth or server failure: retrying the plan will not help.
    Fatal(PlanError),
    /// An answer we could not use: worth one more try.
    Bad(String),
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn feedback(problem: &str) -> String {
    format!(
        "That answer was rejected: {problem}. Reply again with only the JSON object \
         {{\"tasks\": [...], \"template\": \"...\"}}: every task on a single line, and the \
         template containing the placeholder {{task}}."
    )
}

/// The JSON schema for `{tasks: [string], template: string}`.
pub fn plan_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "tasks": {"type": "array", "items": {"type": "string"}},
            "template": {"type": "string"}
        },
        "required": ["tasks", "template"],
        "additionalProperties": false
    })
}

#[derive(serde::Deserialize)]
struct RawPlan {
    tasks: Vec<String>,
    template: String,
}

/// Reads a plan from the answer's content: bare JSON, a fenced block, or the
/// outermost `{...}` inside prose (servers that ignore `response_format`).
pub fn parse_plan(content: &str) -> Result<Plan, String> {
    let content = content.trim();
    if content.is_empty() {
        return Err("the answer was empty".into());
    }
    let mut candidates = vec![content];
    if let Some(start) = content.find("```") {
        let after = &content[start + 3..];
        let body = after.split_once('\n').map(|(_, b)| b).unwrap_or(after);
        if let Some(end) = body.find("```") {
            candidates.push(body[..end].trim());
        }
    }
    if let (Some(a), Some(b)) = (content.find('{'), content.rfind('}')) {
        if a < b {
            candidates.push(&content[a..=b]);
        }
    }
    let mut first_error = None;
    for c in candidates {
        match serde_json::from_str::<RawPlan>(c) {
            Ok(raw) => {
                let tasks = raw.tasks.iter().map(|t| t.trim().to_string()).collect();
                return Ok(Plan {
                    tasks,
                    template: raw.template,
                });
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(format!(
        "the answer is not the JSON object {{\"tasks\": [...], \"template\": \"...\"}} ({})",
        first_error.map(|e| e.to_string()).unwrap_or_default()
    ))
}

/// Validates a chunk's plan; a part of a long document may have no tasks.
fn check(plan: Plan, allow_empty: bool) -> Result<Plan, String> {
    let result = if allow_empty && plan.tasks.is_empty() {
        check_template(&plan.template)
    } else {
        plan.validate()
    };
    result.map(|_| plan).map_err(|e| e.to_string())
}

/// Concatenates chunk plans in order, dropping repeated tasks (compared
/// case-insensitively, whitespace and trailing dots ignored). The first
/// chunk's template is the plan's template: it saw the document's preamble.
pub fn merge(plans: Vec<Plan>) -> Plan {
    let mut seen = HashSet::new();
    let mut tasks = Vec::new();
    let mut template = String::new();
    for p in plans {
        if template.is_empty() {
            template = p.template;
        }
        for t in p.tasks {
            let key = t.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
            if seen.insert(key.trim_end_matches('.').to_string()) {
                tasks.push(t);
            }
        }
    }
    Plan { tasks, template }
}

/// Splits `doc` into chunks of at most `max` bytes, in order, cutting between
/// paragraphs when possible and else between lines (a line longer than `max`
/// becomes a chunk of its own). Blank-only documents give no chunk.
pub fn chunks(doc: &str, max: usize) -> Vec<String> {
    let max = max.max(1);
    // Units: paragraphs, or the lines of a paragraph too big to keep whole.
    let mut units: Vec<String> = Vec::new();
    let doc = doc.replace("\r\n", "\n");
    for para in doc.split("\n\n").map(|p| p.trim_matches('\n')) {
        if para.trim().is_empty() {
            continue;
        }
        if para.len() <= max {
            units.push(para.to_string());
        } else {
            units.extend(para.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
        }
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for u in units {
        let sep = if cur.is_empty() { 0 } else { 2 };
        if !cur.is_empty() && cur.len() + sep + u.len() > max {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push_str("\n\n");
        }
        cur.push_str(&u);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[cfg(test)]
#[path = "llm_tests.rs"]
mod tests;
