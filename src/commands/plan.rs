//! `cohort plan INPUT [-o DIR]`

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::config::{Config, Sources};
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

/// Which planner the flags and settings choose.
fn planner_kind(flags: &PlannerFlags, config: &Config) -> Result<PlannerKind> {
    match (flags.planner, config.planner.backend.as_deref()) {
        (Some(k), _) => Ok(k),
        (None, None | Some("rules")) => Ok(PlannerKind::Rules),
        (None, Some("llm")) => Ok(PlannerKind::Llm),
        (None, Some(other)) => Err(usage(format!(
            "[planner] backend = {other:?} is unknown; use \"rules\" or \"llm\""
        ))),
    }
}

/// Plans a document with the configured planner.
pub async fn make_plan(input: &Path, flags: &PlannerFlags, config: &Config) -> Result<Plan> {
    let kind = planner_kind(flags, config)?;
    let doc = plan::read_document(input)?;
    match kind {
        PlannerKind::Rules => Ok(plan::rules::plan(&doc, &input.display().to_string())?),
        PlannerKind::Llm => {
            let planner = ModelPlanner::new(flags, config)?;
            eprintln!("planning with model {}", planner.planner.model);
            planner.call(|p| async move { p.plan(&doc).await }).await
        }
    }
}

/// The model planner when the flags and settings choose it (for calibration's revision).
pub fn model_planner(flags: &PlannerFlags, config: &Config) -> Result<Option<ModelPlanner>> {
    match planner_kind(flags, config)? {
        PlannerKind::Rules => Ok(None),
        PlannerKind::Llm => Ok(Some(ModelPlanner::new(flags, config)?)),
    }
}

/// The model planner with where its calls go. With a key, each call goes through a model
/// gateway on loopback, the same client as the agents': the planner sends a token there, and
/// the key goes only from the gateway.
pub struct ModelPlanner {
    planner: plan::llm::LlmPlanner,
    upstream: Option<String>,
    key: Option<crate::secret::Secret>,
}

impl ModelPlanner {
    fn new(flags: &PlannerFlags, config: &Config) -> Result<ModelPlanner> {
        let model = flags.planner_model.clone().or(config.planner.model.clone());
        Ok(ModelPlanner {
            planner: plan::llm::LlmPlanner::new(model.unwrap_or_else(|| plan::llm::DEFAULT_MODEL.into())),
            upstream: flags.planner_base_url.clone().or(config.planner.base_url.clone()),
            key: super::run::api_key(config)?,
        })
    }

    async fn call<T, F, Fut>(&self, f: F) -> Result<T>
    where
        F: FnOnce(plan::llm::LlmPlanner) -> Fut,
        Fut: std::future::Future<Output = Result<T, plan::PlanError>>,
    {
        let mut planner = self.planner.clone();
        let Some(key) = self.key.clone() else {
            planner.base_url = self.upstream.clone();
            return Ok(f(planner).await?);
        };
        let gateway = crate::gateway::Gateway::start(crate::gateway::GatewayConfig::new(
            self.upstream
                .clone()
                .unwrap_or_else(|| plan::llm::DEFAULT_BASE_URL.to_string()),
            key,
        ))?;
        let token = gateway.issue(crate::gateway::TaskKey {
            run_id: "plan".into(),
            index: 0,
            attempt: 1,
        });
        planner.base_url = gateway.base_url();
        planner.shown_base = self.upstream.clone();
        planner.key = Some(crate::secret::Secret::new(token.expose()));
        tracing::debug!(gateway = ?gateway.addr(), "planning through the model gateway");
        let out = f(planner).await;
        drop(token);
        gateway.shutdown().await;
        Ok(out?)
    }
}

#[async_trait::async_trait]
impl crate::run::calibrate::TemplateReviser for ModelPlanner {
    async fn revise(&self, template: &str, task: &str, evidence: &str) -> Result<String> {
        let (template, task, evidence) = (template.to_string(), task.to_string(), evidence.to_string());
        self.call(|p| async move { p.revise_template(&template, &task, &evidence).await })
            .await
    }
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let root = crate::git::RepoPaths::discover(&std::env::current_dir()?)
        .ok()
        .map(|p| p.workdir);
    let loaded = Sources::user(config_path, root.as_deref()).load()?;
    let flags = PlannerFlags {
        planner: args.planner,
        planner_model: args.model.clone(),
        planner_base_url: args.base_url.clone(),
    };
    // The model planner sends the key ([planner] base_url decides where): it needs trusted
    // settings. The rule planner uses none of the sensitive ones.
    let config = match planner_kind(&flags, &loaded.config)? {
        PlannerKind::Llm => loaded.trusted()?,
        PlannerKind::Rules => loaded.lenient(),
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
    if dir.exists() && !dir.is_dir() {
        return Err(usage(format!(
            "-o {}: not a directory; -o names the directory that gets tasks.txt and prompt.txt",
            dir.display()
        )));
    }
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
    // Nothing is written yet: a directory that cannot be made is the -o argument's problem.
    std::fs::create_dir_all(dir).map_err(|e| usage(format!("-o {}: cannot create it: {e}", dir.display())))?;
    let write = |content: &str| -> Result<tempfile::NamedTempFile> {
        let mut f = tempfile::NamedTempFile::new_in(dir)
            .with_context(|| format!("cannot write a file in {}", dir.display()))?;
        f.write_all(content.as_bytes())?;
        f.as_file().sync_all()?;
        Ok(f)
    };
    let tasks = write(&(plan.tasks.join("\n") + "\n"))?;
    let prompt = write(&plan.template)?;
    // Two renames are not one atomic step: an old tasks.txt is moved aside
    // first, so a failed second rename can put it back (and a new one is
    // removed), leaving the directory as it was.
    let old_tasks = match std::fs::symlink_metadata(&tasks_path) {
        Ok(_) => {
            let aside = tempfile::Builder::new()
                .prefix(".tasks.txt.old")
                .tempfile_in(dir)?
                .into_temp_path();
            std::fs::rename(&tasks_path, &aside).with_context(|| format!("cannot replace {}", tasks_path.display()))?;
            Some(aside)
        }
        Err(_) => None,
    };
    // Puts the old tasks.txt back, or removes the new one when there was none.
    let restore = || match &old_tasks {
        Some(aside) => std::fs::rename(aside, &tasks_path),
        None => std::fs::remove_file(&tasks_path),
    };
    if let Err(e) = tasks.persist(&tasks_path) {
        let _ = restore();
        return Err(e.error).with_context(|| format!("cannot write {}", tasks_path.display()));
    }
    if let Err(e) = prompt.persist(&prompt_path) {
        let what = match restore() {
            Ok(()) => "tasks.txt was left as it was",
            Err(_) => "tasks.txt could not be put back either; check both files",
        };
        return Err(e.error).with_context(|| format!("cannot write {} ({what})", prompt_path.display()));
    }
    // The old tasks.txt (moved aside) is removed when `old_tasks` is dropped.
    drop(old_tasks);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            tasks: vec!["new task".into()],
            template: "new {task}\n".into(),
        }
    }

    #[test]
    fn a_failed_second_rename_leaves_the_old_plan_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tasks.txt"), "old task\n").unwrap();
        // prompt.txt is a directory: renaming the new prompt onto it fails.
        std::fs::create_dir(dir.path().join("prompt.txt")).unwrap();
        assert!(write_plan(dir.path(), &plan(), true).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tasks.txt")).unwrap(),
            "old task\n"
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["prompt.txt", "tasks.txt"], "no temporary files are left");
    }

    #[test]
    fn a_failed_second_rename_removes_a_new_tasks_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("prompt.txt")).unwrap();
        assert!(write_plan(dir.path(), &plan(), true).is_err());
        assert!(!dir.path().join("tasks.txt").exists());
    }
}
