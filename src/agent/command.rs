//! Any program as an agent, from an argv template (no shell involved).

use anyhow::{bail, Result};

use super::{Agent, Invocation, TaskContext};

/// `{prompt_file}` and `{task}` in any argument are replaced; nothing is
/// re-split or interpreted, so task text with quotes or `$(...)` stays text.
pub struct CommandAgent {
    argv: Vec<String>,
}

impl CommandAgent {
    pub fn new(argv: Vec<String>) -> Result<CommandAgent> {
        if argv.is_empty() || argv[0].trim().is_empty() {
            bail!("the agent command is empty; pass --agent-command 'PROGRAM ARGS…' or set [agent] command in cohort.toml");
        }
        Ok(CommandAgent { argv })
    }

    /// Splits a command line the way a shell would split words (quotes and
    /// backslashes), without running a shell.
    pub fn parse(line: &str) -> Result<CommandAgent> {
        match shlex::split(line) {
            Some(argv) => CommandAgent::new(argv),
            None => bail!("cannot parse --agent-command {line:?}: unbalanced quotes"),
        }
    }
}

#[async_trait::async_trait]
impl Agent for CommandAgent {
    fn name(&self) -> &'static str {
        "command"
    }

    fn invocation(&self, ctx: &TaskContext) -> Result<Invocation> {
        let prompt_file = ctx.prompt_file.display().to_string();
        let fill = |a: &String| a.replace("{prompt_file}", &prompt_file).replace("{task}", &ctx.task);
        let mut env = vec![
            ("COHORT_TASK".into(), ctx.task.clone()),
            ("COHORT_TASK_ID".into(), format!("{:03}", ctx.index)),
            ("COHORT_RUN_ID".into(), ctx.run_id.clone()),
            ("COHORT_PROMPT_FILE".into(), prompt_file.clone()),
            ("COHORT_ATTEMPT".into(), ctx.attempt.to_string()),
        ];
        // A re-run after a failed verify: the failure is in this file.
        if let Some(f) = &ctx.feedback {
            env.push(("COHORT_FEEDBACK_FILE".into(), f.file.display().to_string()));
        }
        Ok(Invocation {
            program: fill(&self.argv[0]),
            args: self.argv[1..].iter().map(fill).collect(),
            env,
            secret_env: Vec::new(),
            stdin: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_fill_whole_arguments_without_resplitting() {
        let agent = CommandAgent::parse("prog --task {task} --file={prompt_file} 'a b'").unwrap();
        let ctx = TaskContext {
            run_id: "r".into(),
            index: 7,
            task: "say \"hi\"; rm -rf / $(x)".into(),
            prompt: String::new(),
            prompt_file: "/tmp/p.txt".into(),
            checkout: "/c".into(),
            scratch: "/s".into(),
            attempt: 1,
            model: None,
            feedback: None,
        };
        let inv = agent.invocation(&ctx).unwrap();
        assert_eq!(inv.program, "prog");
        assert_eq!(
            inv.args,
            ["--task", "say \"hi\"; rm -rf / $(x)", "--file=/tmp/p.txt", "a b"]
        );
        assert!(inv.env.contains(&("COHORT_TASK_ID".into(), "007".into())));
        assert!(!inv.env.iter().any(|(k, _)| k == "COHORT_FEEDBACK_FILE"));
        let ctx = TaskContext {
            feedback: Some(crate::agent::Feedback {
                message: "m".into(),
                file: "/s/feedback-1.txt".into(),
                thread: None,
            }),
            ..ctx
        };
        let inv = agent.invocation(&ctx).unwrap();
        assert!(inv
            .env
            .contains(&("COHORT_FEEDBACK_FILE".into(), "/s/feedback-1.txt".into())));
        assert!(CommandAgent::parse("'unbalanced").is_err());
        assert!(CommandAgent::parse("").is_err());
    }
}
