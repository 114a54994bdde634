//! Calibration's second chance: the light model reads how task 1 went (its log and the
//! verify command's failure) and proposes a better prompt template. Same endpoint, same
//! answer format and validation as planning; one retry on an unusable answer.

use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage,
};

use super::llm::{parse_plan, Ask, LlmPlanner};
use super::{check_template, PlanError};

const SYSTEM_PROMPT: &str = "\
You improve the prompt template that coding agents receive for each task of a backlog.
The first task was run with the current template and did not succeed; its log follows.
Reply with a JSON object only: {\"tasks\": [string], \"template\": string}, where tasks \
repeats the first task and template is the improved template. The template must contain \
the placeholder {task} where the task text goes. Keep what works, fix what made the task \
fail (missing context, wrong instructions, the project's checks).";

impl LlmPlanner {
    /// A revised template for `template`, given task 1's text and what happened (`evidence`:
    /// the end of its log and its verify failures).
    pub async fn revise_template(&self, template: &str, task: &str, evidence: &str) -> Result<String, PlanError> {
        let client = self.client()?;
        let request = format!(
            "Current template:\n<template>\n{template}\n</template>\n\nFirst task: {task}\n\n\
             What happened (the end of the task's log):\n<log>\n{evidence}\n</log>\n"
        );
        let mut messages: Vec<ChatCompletionRequestMessage> = vec![
            ChatCompletionRequestSystemMessage::from(SYSTEM_PROMPT).into(),
            ChatCompletionRequestUserMessage::from(request).into(),
        ];
        let mut problem = String::new();
        for attempt in 0..2 {
            let answer = match self.ask(&client, &messages).await {
                Ok(a) => a,
                Err(Ask::Fatal(e)) => return Err(e),
                Err(Ask::Bad(p)) => {
                    problem = p;
                    continue;
                }
            };
            let checked = parse_plan(&answer).and_then(|p| {
                check_template(&p.template).map_err(|e| e.to_string())?;
                Ok(p.template)
            });
            match checked {
                Ok(t) => return Ok(t),
                Err(p) => {
                    problem = p;
                    if attempt == 0 {
                        messages.push(ChatCompletionRequestAssistantMessage::from(answer).into());
                        let again =
                            format!("That answer was rejected: {problem}. Reply again with only the JSON object.");
                        messages.push(ChatCompletionRequestUserMessage::from(again).into());
                    }
                }
            }
        }
        Err(PlanError::Model(self.scrub(format!(
            "the revised template from {} was still invalid after one retry: {problem}",
            self.endpoint()
        ))))
    }
}
