//! Publishing a run: the service branch (and, when asked, the branches of tasks that did
//! not merge) pushed to origin, each as a compare-and-swap against the remote's value at
//! the last fetch, the way `git push --force-with-lease` works.
//!
//! The user's own branch is never pushed. When origin's service branch moved since cohort
//! last pushed it (another service, a person), it is merged into the local one first, so
//! a push never drops anybody's commits; a conflict there is a refusal, not a force.

use std::sync::atomic::AtomicBool;

use anyhow::Result;

use super::merge::merge_trees_of;
use super::push::{self, RefOutcome, Update};
use super::remote::{self, Access, RemoteError};
use super::{is_ancestor, refs, write_commit};

/// One branch as published.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PublishedRef {
    /// The short branch name (`cohort/service`).
    pub branch: String,
    /// The local tip offered.
    pub commit: String,
    /// Origin's value at the last fetch (none: the branch was new there).
    pub remote_before: Option<String>,
    /// `pushed`, `up to date` or `rejected`.
    pub status: String,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Published {
    /// Origin's push URL, without credentials.
    pub url: String,
    pub refs: Vec<PublishedRef>,
    /// For well-known hosts: a page comparing `compare_base` with the service branch.
    pub compare_url: Option<String>,
}

impl Published {
    pub fn rejected(&self) -> impl Iterator<Item = &PublishedRef> {
        self.refs.iter().filter(|r| r.status == "rejected")
    }
}

/// Pushes `service` and `task_branches` (short names) to origin. `compare_base` is the
/// commit the run started from, for the compare link.
pub fn publish(
    repo: &gix::Repository,
    access: &Access,
    service: &str,
    task_branches: &[String],
    compare_base: Option<&str>,
) -> Result<Published> {
    let url = remote::origin_url(repo, gix::remote::Direction::Push).ok_or_else(|| RemoteError::Other {
        what: "push to",
        url: "origin".into(),
        cause: "there is no remote 'origin' (`git remote add origin URL`), so there is nowhere to push".into(),
    })?;
    let mut refused = Vec::new();
    let mut updates = Vec::new();
    match service_update(repo, service)? {
        Ok(u) => updates.push(u),
        Err(reason) => refused.push((service.to_string(), reason)),
    }
    for b in task_branches {
        let Some(tip) = refs::read(repo, &format!("refs/heads/{b}"))? else {
            continue;
        };
        let expect = refs::read(repo, &tracking(b))?;
        updates.push(Update {
            name: format!("refs/heads/{b}"),
            expect,
            new: tip,
        });
    }
    let mut out = Published {
        url: remote::display_url(&url),
        refs: Vec::new(),
        compare_url: compare_base.and_then(|base| compare_url(&url, base, service)),
    };
    for (branch, reason) in refused {
        let commit = refs::read(repo, &format!("refs/heads/{branch}"))?.map(|c| c.to_string());
        out.refs.push(PublishedRef {
            branch,
            commit: commit.unwrap_or_default(),
            remote_before: None,
            status: "rejected".into(),
            reason: Some(reason),
        });
    }
    let (to_send, up_to_date): (Vec<Update>, Vec<Update>) = updates.into_iter().partition(|u| u.expect != Some(u.new));
    for u in up_to_date {
        out.refs.push(published(&u, "up to date", None));
    }
    if to_send.is_empty() {
        return Ok(out);
    }
    let mut transport = remote::connect(repo, &url, access)?;
    let mut auth = remote::authenticate(repo, &url, access)?;
    let interrupt = AtomicBool::new(false);
    let pushed = push::push(repo, &mut *transport, &mut auth, &to_send, &interrupt).map_err(|e| push_error(&url, e))?;
    for (u, (_, outcome)) in to_send.iter().zip(pushed.refs) {
        match outcome {
            RefOutcome::Updated | RefOutcome::UpToDate => {
                // As git does after a push: the remote-tracking ref is what origin now has,
                // so the next push's expectation is this one.
                let short = u.name.trim_start_matches("refs/heads/");
                let track = tracking(short);
                let now = refs::read(repo, &track)?;
                refs::cas(repo, &track, now, u.new, "cohort: pushed")?;
                out.refs.push(published(u, "pushed", None));
            }
            RefOutcome::Rejected { reason } => out.refs.push(published(u, "rejected", Some(reason))),
        }
    }
    Ok(out)
}

fn published(u: &Update, status: &str, reason: Option<String>) -> PublishedRef {
    PublishedRef {
        branch: u.name.trim_start_matches("refs/heads/").to_string(),
        commit: u.new.to_string(),
        remote_before: u.expect.map(|c| c.to_string()),
        status: status.into(),
        reason,
    }
}

/// The remote-tracking ref of a branch on origin.
fn tracking(branch: &str) -> String {
    format!("refs/remotes/origin/{branch}")
}

/// The service branch's update. When origin's copy (as last fetched) is not in the local
/// branch, it is merged in first, so the push keeps it; `Err(reason)` when that conflicts.
fn service_update(repo: &gix::Repository, service: &str) -> Result<Result<Update, String>> {
    let name = format!("refs/heads/{service}");
    let Some(mut local) = refs::read(repo, &name)? else {
        return Ok(Err(format!("there is no local branch {service} to push")));
    };
    let expect = refs::read(repo, &tracking(service))?;
    if let Some(theirs) = expect.filter(|t| *t != local) {
        if !is_ancestor(repo, theirs, local)? {
            match merge_trees_of(repo, local, theirs)? {
                Ok(tree) => {
                    let msg = format!("Merge origin's {service} into {service}\n");
                    let merged = write_commit(repo, tree, &[local, theirs], &msg)?;
                    refs::cas(
                        repo,
                        &name,
                        Some(local),
                        merged,
                        "cohort: merge origin's service branch",
                    )?;
                    local = merged;
                }
                Err(paths) => {
                    return Ok(Err(format!(
                        "origin's {service} has commits that conflict with cohort's (in {}); merge \
                         origin/{service} into {service} by hand, and the next push sends it",
                        paths.join(", ")
                    )))
                }
            }
        }
    }
    Ok(Ok(Update {
        name,
        expect,
        new: local,
    }))
}

/// A failed push, in the terms of the remote's errors (credentials: exit 2).
fn push_error(url: &gix::Url, e: push::PushError) -> RemoteError {
    match e {
        push::PushError::Auth { message, .. } => {
            let mut err = remote::classify_message(url, &message);
            if let RemoteError::Other { .. } = err {
                err = RemoteError::Auth {
                    url: remote::display_url(url),
                    fix: remote::auth_fix(url, &message),
                };
            }
            err
        }
        push::PushError::Connect { message, .. } => remote::classify_message(url, &message),
        other => RemoteError::Other {
            what: "push to",
            url: remote::display_url(url),
            cause: other.to_string(),
        },
    }
}

/// A page that shows what the run added, for hosts whose URL scheme for it is known.
pub fn compare_url(url: &gix::Url, base: &str, branch: &str) -> Option<String> {
    let host = url.host()?;
    let path = url.path.to_string();
    let path = path
        .trim_start_matches('/')
        .trim_end_matches('/')
        .trim_end_matches(".git");
    if path.is_empty() || path.contains("..") {
        return None;
    }
    match host {
        "github.com" => Some(format!("https://github.com/{path}/compare/{base}...{branch}")),
        "gitlab.com" => Some(format!("https://gitlab.com/{path}/-/compare/{base}...{branch}")),
        "codeberg.org" => Some(format!("https://codeberg.org/{path}/compare/{base}...{branch}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_links_for_well_known_hosts() {
        let u = |s: &str| gix::url::parse(gix::bstr::BStr::new(s)).unwrap();
        assert_eq!(
            compare_url(&u("https://github.com/o/r.git"), "abc", "cohort/service").as_deref(),
            Some("https://github.com/o/r/compare/abc...cohort/service")
        );
        assert_eq!(
            compare_url(&u("git@github.com:o/r.git"), "abc", "s").as_deref(),
            Some("https://github.com/o/r/compare/abc...s")
        );
        assert_eq!(
            compare_url(&u("ssh://git@gitlab.com/g/sub/r.git"), "abc", "s").as_deref(),
            Some("https://gitlab.com/g/sub/r/-/compare/abc...s")
        );
        assert_eq!(compare_url(&u("https://git.example.com/o/r.git"), "abc", "s"), None);
    }
}
