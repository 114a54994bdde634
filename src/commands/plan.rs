//! `cohort plan INPUT [-o DIR]`

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::config::Config;
use crate::plan::{self, Plan};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The request document (Markdown or plain text).
    pub input: PathBuf,
    /// Write DIR/tasks.txt and DIR/prompt.txt (without it, the plan is printed and nothing is written).
    #[arg(short, long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Which planner turns the document into tasks (default: [planner] backend, else rules).
    #[arg(long, value_enum)]
    pub planner: Option<PlannerKind>,
    /// The planner's model (default: [planner] model, else gpt-5-nano).
    #[arg(long, value_name = "MODEL")]
    pub model: Option<String>,
    /// The planner's OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 for ollama.
    #[arg(long, value_name = "URL")]
    pub base_url: Option<String>,
    /// Replace tasks.txt and prompt.txt if DIR already has them.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlannerKind {
    /// The embedded rule-based planner; needs no model.
    Rules,
    /// A light model through any OpenAI-compatible Chat Completions endpoint (key: OPENAI_API_KEY).
    Llm,
}

/// The planner flags of `run INPUT` (on `plan` they are --model and --base-url).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct PlannerFlags {
    /// Which planner turns the document into tasks (default: [planner] backend, else rules).
    #[arg(long, value_enum)]
    pub planner: Option<PlannerKind>,
    /// The planner's model (default: [planner] model, else gpt-5-nano).
    #[arg(long = "planner-model", value_name = "MODEL")]
    pub planner_model: Option<String>,
    /// The planner's OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 for ollama.
    #[arg(long = "planner-base-url", value_name = "URL")]
    pub planner_base_url: Option<String>,
}

/// Plans a document with the configured planner.
pub async fn make_plan(input: &Path, flags: &PlannerFlags, config: &Config) -> Result<Plan> {
    let kind = match (flags.planner, config.planner.backend.as_deref()) {
        (Some(k), _) => k,
        (None, None | Some("rules")) => PlannerKind::Rules,
        (None, Some("llm")) => PlannerKind::Llm,
        (None, Some(other)) => {
            return Err(usage(format!(
                "[planner] backend = {other:?} is unknown; use \"rules\" or \"llm\""
            )));
        }
    };
    let doc = plan::read_document(input)?;
    match kind {
        PlannerKind::Rules => Ok(plan::rules::plan(&doc, &input.display().to_string())?),
        PlannerKind::Llm => {
            let model = flags.planner_model.clone().or(config.planner.model.clone());
            let mut planner = plan::llm::LlmPlanner::new(model.unwrap_or_else(|| plan::llm::DEFAULT_MODEL.into()));
            planner.base_url = flags.planner_base_url.clone().or(config.planner.base_url.clone());
            planner.key = super::run::api_key(config)?;
            eprintln!("planning with model {}", planner.model);
            Ok(planner.plan(&doc).await?)
        }
    }
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let root = crate::git::RepoPaths::discover(&std::env::current_dir()?)
        .ok()
        .map(|p| p.workdir);
    let config = Config::load(config_path, root.as_deref())?;
    let flags = PlannerFlags {
        planner: args.planner,
        planner_model: args.model.clone(),
        planner_base_url: args.base_url.clone(),
    };
    let plan = make_plan(&args.input, &flags, &config).await?;
    match &args.out {
        None => {
            let mut out = std::io::stdout().lock();
            for t in &plan.tasks {
                writeln!(out, "{t}")?;
            }
            eprintln!(
                "{} tasks (pass -o DIR to write tasks.txt and prompt.txt)",
                plan.tasks.len()
            );
        }
        Some(dir) => {
            write_plan(dir, &plan, args.force)?;
            eprintln!(
                "wrote {} tasks to {} and the template to {}",
                plan.tasks.len(),
                dir.join("tasks.txt").display(),
                dir.join("prompt.txt").display()
            );
        }
    }
    Ok(0)
}

/// Writes both files through temporary files and renames, so a failure
/// never leaves half a plan behind.
pub fn write_plan(dir: &Path, plan: &Plan, force: bool) -> Result<()> {
    plan.validate()?;
    let tasks_path = dir.join("tasks.txt");
    let prompt_path = dir.join("prompt.txt");
    if !force {
        for p in [&tasks_path, &prompt_path] {
            if p.exists() {
                return Err(usage(format!(
                    "{} already exists; pass --force to replace it",
                    p.display()
                )));
            }
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |content: &str| -> Result<tempfile::NamedTempFile> {
        let mut f = tempfile::NamedTempFile::new_in(dir)?;
        f.write_all(content.as_bytes())?;
        f.as_file().sync_all()?;
        Ok(f)
    };
    let tasks = write(&(plan.tasks.join("\n") + "\n"))?;
    let prompt = write(&plan.template)?;
    tasks.persist(&tasks_path)?;
    prompt.persist(&prompt_path)?;
    Ok(())
}

/// Reads a task list (one task per line; blank lines skipped) and a template.
pub fn read_plan_files(tasks: &Path, prompt: &Path) -> Result<Plan> {
    let text = plan::read_document(tasks)?;
    let template = plan::read_text(prompt)?;
    let plan = Plan {
        tasks: text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect(),
        template,
    };
    plan.validate().map_err(|e| match e {
        plan::PlanError::NoTasks { .. } => plan::PlanError::NoTasks {
            path: tasks.display().to_string(),
        },
        other => other,
    })?;
    Ok(plan)
}
