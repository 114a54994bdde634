//! Request document -> `Plan { tasks, template }`.
//!
//! Two planners sit behind the same entry point: the embedded rule-based one
//! (`rules`, no model needed) and the model-backed one (`llm`). Both return a
//! value; writing the plan files is the caller's job, done atomically.

pub mod llm;
mod revise;
pub mod rules;

use std::path::Path;

/// A uniform task list plus a prompt template with a `{task}` placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub tasks: Vec<String>,
    pub template: String,
}

/// The placeholder every prompt template must contain.
pub const PLACEHOLDER: &str = "{task}";

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("{path}: the file is empty; write one task per list item or paragraph")]
    Empty { path: String },
    #[error("{path}: this looks like a binary file, not Markdown or plain text")]
    Binary { path: String },
    #[error("{path}: no tasks found (every item is checked off, or there is no text)")]
    NoTasks { path: String },
    #[error("the prompt template has no `{{task}}` placeholder; add it where the task text should go")]
    NoPlaceholder,
    #[error("task {index} spans several lines; a task must be a single line")]
    MultiLine { index: usize },
    #[error("task {index} is empty")]
    EmptyTask { index: usize },
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("the model planner failed: {0}")]
    Model(String),
}

impl Plan {
    /// Checks the invariants every planner's output must meet.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.tasks.is_empty() {
            return Err(PlanError::NoTasks { path: "plan".into() });
        }
        for (i, t) in self.tasks.iter().enumerate() {
            if t.trim().is_empty() {
                return Err(PlanError::EmptyTask { index: i + 1 });
            }
            if t.contains('\n') || t.contains('\r') {
                return Err(PlanError::MultiLine { index: i + 1 });
            }
        }
        check_template(&self.template)
    }

    /// The prompt for one task: the template with `{task}` filled in.
    pub fn prompt_for(template: &str, task: &str) -> String {
        template.replace(PLACEHOLDER, task)
    }
}

pub fn check_template(template: &str) -> Result<(), PlanError> {
    if template.contains(PLACEHOLDER) {
        Ok(())
    } else {
        Err(PlanError::NoPlaceholder)
    }
}

/// Reads a request document, refusing empty and binary files.
pub fn read_document(path: &Path) -> Result<String, PlanError> {
    let text = read_text(path)?;
    if text.trim().is_empty() {
        return Err(PlanError::Empty {
            path: path.display().to_string(),
        });
    }
    Ok(text)
}

/// Reads a text file (a document, task list or prompt template): one that
/// cannot be read, or is not UTF-8 text, is an input error.
pub fn read_text(path: &Path) -> Result<String, PlanError> {
    let shown = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| PlanError::Read {
        path: shown.clone(),
        source,
    })?;
    if bytes.contains(&0) {
        return Err(PlanError::Binary { path: shown });
    }
    String::from_utf8(bytes).map_err(|_| PlanError::Binary { path: shown })
}
