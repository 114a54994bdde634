//! Names cohort gives to runs, branches and checkouts.

/// A run id: sortable by time, short, and safe in refs and paths,
/// e.g. `20261125-153012-7f3a`.
pub fn new_run_id() -> String {
    let now = std::time::SystemTime::now();
    let stamp = humantime::format_rfc3339_seconds(now).to_string(); // 2026-11-25T15:30:12Z
    let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
    let suffix: u16 = rand::random();
    format!("{}-{}-{:04x}", &digits[..8], &digits[8..14], suffix)
}

/// An ASCII slug of a task, safe in ref names and paths: lowercase letters,
/// digits and single dashes, at most 40 characters.
pub fn slug(task: &str) -> String {
    let mut out = String::new();
    let mut dash = false;
    for c in task.chars() {
        if c.is_ascii_alphanumeric() {
            if dash && !out.is_empty() {
                out.push('-');
            }
            dash = false;
            out.push(c.to_ascii_lowercase());
            if out.len() >= 40 {
                break;
            }
        } else {
            dash = true;
        }
    }
    if out.is_empty() {
        "task".into()
    } else {
        out
    }
}

/// `cohort/task/<run-id>/<NNN>-<slug>`
pub fn task_branch(run_id: &str, index: usize, task: &str) -> String {
    format!("cohort/task/{run_id}/{index:03}-{}", slug(task))
}

/// Why `name` cannot be the service branch, if it cannot: it must be a
/// branch name git accepts, and must not clash with cohort's task branches.
pub fn check_service_branch(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("it is empty".into());
    }
    if name.starts_with('-') || name == "HEAD" {
        return Err("git does not allow a branch of that name".into());
    }
    if gix::refs::FullName::try_from(format!("refs/heads/{name}")).is_err() {
        return Err(
            "git does not allow it in a branch name (spaces, `..`, `~^:?*[\\`, a trailing `.lock` or `/`, ...)".into(),
        );
    }
    if name == "cohort/task" || name.starts_with("cohort/task/") {
        return Err("cohort/task/ holds the task branches".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_branch_names() {
        for ok in ["cohort/service", "main-2", "team/x.y", "cohort/tasks"] {
            assert_eq!(check_service_branch(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-x",
            "HEAD",
            "a..b",
            "a b",
            "x.lock",
            "x/",
            "a~1",
            "cohort/task",
            "cohort/task/x",
        ] {
            assert!(check_service_branch(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn slugs_are_ref_safe() {
        assert_eq!(slug("Add a README"), "add-a-readme");
        assert_eq!(
            slug("fix `rm -rf /`; echo $(whoami) && \"quoted\""),
            "fix-rm-rf-echo-whoami-quoted"
        );
        assert_eq!(slug("Übersetze die Datei ✓"), "bersetze-die-datei");
        assert_eq!(slug("日本語"), "task");
        assert_eq!(slug("a/b/../c"), "a-b-c");
        let long = slug(&"word ".repeat(40));
        assert!(long.len() <= 44 && !long.ends_with('-'));
        for s in ["x..y", "x.lock", "-x-", "@{x}", "a b"] {
            let name = format!("refs/heads/{}", task_branch("20261125-000000-abcd", 1, s));
            assert!(gix::refs::FullName::try_from(name.as_str()).is_ok(), "{name}");
        }
    }

    #[test]
    fn run_ids_sort_by_time_and_are_path_safe() {
        let a = new_run_id();
        assert_eq!(a.len(), "20261125-153012-7f3a".len());
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'), "{a}");
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let b = new_run_id();
        assert!(a[..15] < b[..15], "{a} then {b}");
    }
}
