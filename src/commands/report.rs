//! `cohort report [RUN] [--json]`

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run to report on (default: the newest).
    pub run: Option<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

fn duration(start: Option<&str>, end: Option<&str>) -> Option<f64> {
    let s = humantime::parse_rfc3339_weak(start?.trim_end_matches('Z')).ok()?;
    let e = humantime::parse_rfc3339_weak(end?.trim_end_matches('Z')).ok()?;
    Some(e.duration_since(s).ok()?.as_secs_f64())
}

/// A line diff of two templates: `-` lines only in the first, `+` lines only in the second,
/// in order (a longest common subsequence; templates are short).
fn template_diff(before: &str, after: &str) -> Vec<String> {
    let (a, b): (Vec<&str>, Vec<&str>) = (before.lines().collect(), after.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, Vec::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push(format!("  {}", a[i]));
            (i, j) = (i + 1, j + 1);
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push(format!("+ {}", b[j]));
            j += 1;
        } else {
            out.push(format!("- {}", a[i]));
            i += 1;
        }
    }
    out
}

pub fn run(args: Args, config_path: Option<&std::path::Path>) -> Result<u8> {
    let (paths, state) = super::open_state()?;
    let (row, tasks) = super::load_run(&state, args.run.as_deref())?;
    let row = super::shown(&paths, row);
    let totals = state.agent_totals(&row.id)?;
    // What the model gateway counted: every request of every attempt, as the endpoint answered.
    let metered = state.gateway_totals(&row.id)?;
    let price = crate::config::Config::load_lenient(config_path, Some(&paths.workdir))?
        .agent
        .price;
    // Each push of the run to origin (a resumed run may have pushed more than once).
    let pushes = state.pushes(&row.id)?;
    // Every run of the verify command: on each task's commits, and on merge results.
    let verifies = state.verifies(&row.id, None)?;
    // Where each task's agent ran last, with remote workers.
    let placed = state.placements(&row.id)?;
    // The prompt template calibration revised, if it did.
    let calibration = state.calibration(&row.id)?;
    let cost = |t: &crate::run::state::AgentTotals| price.map(|p| p.cost(t.input, t.cached_input, t.output));
    let gateway_cost = |t: &crate::run::state::GatewayTotals| price.map(|p| p.cost(t.input, t.cached_input, t.output));
    let code = crate::run::Summary {
        run_id: row.id.clone(),
        tasks: tasks.clone(),
        interrupted: false,
        push: None,
        calibration: None,
    }
    .exit_code();
    if args.json {
        let mut all = crate::run::state::GatewayTotals::default();
        for g in metered.values() {
            all.input += g.input;
            all.cached_input += g.cached_input;
            all.output += g.output;
            all.requests += g.requests;
        }
        // The run's spend, as the gateway metered it.
        let spend = serde_json::json!({
            "tokens": all.input + all.output, "input": all.input, "cached_input": all.cached_input,
            "output": all.output, "requests": all.requests, "cost_usd": gateway_cost(&all),
        });
        let out = serde_json::json!({
            "run": row,
            "tasks": tasks.iter().map(|t| {
                let mut v = serde_json::to_value(t).unwrap_or_default();
                v["duration_secs"] = duration(t.started_at.as_deref(), t.ended_at.as_deref()).into();
                let a = totals.get(&t.index).cloned().unwrap_or_default();
                v["thread_id"] = a.thread_id.clone().into();
                v["tokens"] = serde_json::json!({"input": a.input, "cached_input": a.cached_input, "output": a.output});
                v["cost_usd"] = cost(&a).into();
                let g = metered.get(&t.index).cloned().unwrap_or_default();
                v["gateway"] = serde_json::json!({
                    "input": g.input, "cached_input": g.cached_input, "output": g.output,
                    "requests": g.requests, "refused": g.refused, "cost_usd": gateway_cost(&g),
                });
                let mine: Vec<_> = verifies.iter().filter(|r| r.idx == t.index).collect();
                v["verifies"] = serde_json::to_value(&mine).unwrap_or_default();
                v["worker"] = placed.get(&t.index).cloned().into();
                v
            }).collect::<Vec<_>>(),
            "spend": spend,
            "pushes": pushes,
            "calibration": calibration,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(code);
    }
    println!("run {} ({}), service branch {}", row.id, row.status, row.service_branch);
    if let Some(c) = &calibration {
        let (before, after) = (c["before"].as_str().unwrap_or(""), c["after"].as_str().unwrap_or(""));
        println!("calibration revised the prompt template after task 1 (prompt.revised.txt in the run's directory):");
        for line in template_diff(before, after) {
            println!("    {line}");
        }
    }
    for t in &tasks {
        let secs = duration(t.started_at.as_deref(), t.ended_at.as_deref())
            .map(|d| format!("{d:.1}s"))
            .unwrap_or_else(|| "-".into());
        let merge = t.merge_commit.as_deref().map(|c| &c[..10.min(c.len())]).unwrap_or("-");
        let exit = t.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        println!("{:03} {:<9} {}", t.index, t.status.as_str(), t.text);
        println!(
            "    branch {}  merge {merge}  files {}  time {secs}  exit {exit}  attempts {}",
            t.branch,
            t.files_changed.len(),
            t.attempts
        );
        if let Some(w) = placed.get(&t.index) {
            println!("    ran on worker {w}");
        }
        if let Some(a) = totals.get(&t.index).filter(|a| a.input + a.output > 0) {
            let c = cost(a).map(|c| format!("  ~${c:.4}")).unwrap_or_default();
            println!(
                "    tokens in {} (cached {}) out {}{c}  (as the agent reported them)",
                a.input, a.cached_input, a.output
            );
        }
        if let Some(g) = metered.get(&t.index).filter(|g| g.requests > 0 || g.refused > 0) {
            let c = gateway_cost(g).map(|c| format!("  ~${c:.4}")).unwrap_or_default();
            println!(
                "    gateway: {} requests, tokens in {} (cached {}) out {}{c}; {} destinations refused",
                g.requests, g.input, g.cached_input, g.output, g.refused
            );
        }
        for v in verifies.iter().filter(|v| v.idx == t.index) {
            let what = match v.kind {
                crate::run::verifies::VerifyKind::Task if v.round == 0 => "its commit".to_string(),
                crate::run::verifies::VerifyKind::Task => format!("its commit after feedback round {}", v.round),
                crate::run::verifies::VerifyKind::Merge => "its merge result".to_string(),
            };
            let outcome = match (v.passed, v.exit_code) {
                (true, _) => "passed".to_string(),
                (false, Some(c)) => format!("failed (exit {c})"),
                (false, None) => "failed".to_string(),
            };
            println!(
                "    verify {what} {}: {outcome} in {:.1}s (attempt {})",
                &v.commit[..10.min(v.commit.len())],
                v.duration_ms as f64 / 1000.0,
                v.attempt
            );
            // The last line the command printed (the whole tail: `report --json`, `logs`).
            if let Some(last) = v
                .failure
                .as_deref()
                .and_then(|f| f.lines().rev().find(|l| !l.trim().is_empty()))
            {
                println!("      {}", last.chars().take(160).collect::<String>());
            }
        }
        let mine: Vec<_> = verifies.iter().filter(|v| v.idx == t.index).collect();
        if let (Some(merge), false) = (&t.merge_commit, mine.is_empty()) {
            let by_merge = mine
                .iter()
                .any(|v| v.passed && v.kind == crate::run::verifies::VerifyKind::Merge && &v.commit == merge);
            println!(
                "    merge {} {}",
                &merge[..10.min(merge.len())],
                if by_merge {
                    "passed the verify command itself"
                } else {
                    "has the tree of a commit that passed the verify command (the service branch had not moved)"
                }
            );
        }
        if let Some(r) = &t.reason {
            println!("    reason: {r}");
        }
    }
    for p in pushes.iter().filter_map(crate::run::PushResult::from_record) {
        for line in p.describe() {
            println!("{line}");
        }
    }
    let mut all = crate::run::state::AgentTotals::default();
    for a in totals.values() {
        all.input += a.input;
        all.cached_input += a.cached_input;
        all.output += a.output;
    }
    if all.input + all.output > 0 {
        let c = cost(&all)
            .map(|c| format!(", estimated cost ${c:.4}"))
            .unwrap_or_else(|| ", set [agent.price] input/output (USD per million tokens) for a cost estimate".into());
        println!(
            "total tokens: in {} (cached {}) out {}{c}",
            all.input, all.cached_input, all.output
        );
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_diff_marks_removed_and_added_lines() {
        let d = super::template_diff("a\nb\nc {task}", "a\nB\nc {task}\nd");
        assert_eq!(d, ["  a", "+ B", "- b", "  c {task}", "+ d"]);
    }
}
