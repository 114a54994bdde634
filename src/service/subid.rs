//! `/etc/subuid` and `/etc/subgid`: the id ranges user namespaces take their ids from.
//!
//! Rootful podman's `userns=auto` (the system service's task containers) takes each
//! container's ids from the ranges of the user `containers`; rootless podman (the user
//! service) from the user's own. Without them every task fails at container creation
//! ("not enough unused IDs in user namespace"), so `doctor` and `service install` check
//! them, and `service install --setup` adds a `containers` range that overlaps none.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The two files; the real ones are [`SubidFiles::etc`], tests point at their own.
#[derive(Debug, Clone)]
pub struct SubidFiles {
    pub subuid: PathBuf,
    pub subgid: PathBuf,
}

impl SubidFiles {
    pub fn etc() -> SubidFiles {
        SubidFiles {
            subuid: "/etc/subuid".into(),
            subgid: "/etc/subgid".into(),
        }
    }

    fn both(&self) -> [&Path; 2] {
        [&self.subuid, &self.subgid]
    }
}

/// The user whose ranges rootful `userns=auto` uses.
pub const CONTAINERS: &str = "containers";
/// The range podman's documentation suggests: the upper half of the id space.
pub const PREFERRED: Range = Range {
    start: 2_147_483_647,
    count: 2_147_483_648,
};
/// Below this many ids a container with a full image (uids up to 65535) does not fit.
pub const ONE_CONTAINER: u64 = 65_536;
/// Ids at or above this are not usable (`(uid_t)-1` and beyond).
const ID_END: u64 = 4_294_967_295;
/// Where a fallback range may start: clear of the system's own users and groups.
const LOW: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub count: u64,
}

impl Range {
    fn end(self) -> u64 {
        self.start.saturating_add(self.count)
    }
    fn overlaps(self, o: Range) -> bool {
        self.start < o.end() && o.start < self.end()
    }
}

impl std::fmt::Display for Range {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.start, self.count)
    }
}

/// One `owner:start:count` line. Lines that are not (blank, comments, malformed) are kept
/// as they are by [`add_range`] and ignored here, as shadow does.
fn parse_line(line: &str) -> Option<(&str, Range)> {
    let mut it = line.trim().splitn(3, ':');
    let owner = it.next().filter(|o| !o.is_empty() && !o.starts_with('#'))?;
    let start = it.next()?.trim().parse().ok()?;
    let count = it.next()?.trim().parse().ok()?;
    Some((owner, Range { start, count }))
}

/// Every range in `text`, with its owner (a name, or a uid as text).
pub fn parse(text: &str) -> Vec<(String, Range)> {
    text.lines()
        .filter_map(parse_line)
        .map(|(o, r)| (o.to_string(), r))
        .collect()
}

/// The ranges `owner` (a user name; also matched by its uid, as shadow does) has in `file`.
/// A missing file has none.
pub fn ranges_of(file: &Path, owner: &str) -> std::io::Result<Vec<Range>> {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let uid = nix::unistd::User::from_name(owner)
        .ok()
        .flatten()
        .map(|u| u.uid.to_string());
    Ok(parse(&text)
        .into_iter()
        .filter(|(o, _)| o == owner || uid.as_deref() == Some(o.as_str()))
        .map(|(_, r)| r)
        .collect())
}

/// What `owner` has in both files.
#[derive(Debug)]
pub enum Verdict {
    /// Ranges in both files; the smaller total of the two.
    Present { ids: u64 },
    /// The files that have no range for `owner`.
    Missing(Vec<PathBuf>),
}

pub fn check(files: &SubidFiles, owner: &str) -> std::io::Result<Verdict> {
    let mut missing = Vec::new();
    let mut ids = u64::MAX;
    for f in files.both() {
        let total: u64 = ranges_of(f, owner)?.iter().map(|r| r.count).sum();
        if total == 0 {
            missing.push(f.to_path_buf());
        }
        ids = ids.min(total);
    }
    Ok(if missing.is_empty() {
        Verdict::Present { ids }
    } else {
        Verdict::Missing(missing)
    })
}

/// A range for `containers` that overlaps no range of anyone in either file: podman's
/// suggested one when it is free, else the largest free stretch above [`LOW`] (at most
/// as large as the suggested one). None when no free stretch holds one container.
pub fn free_range(files: &SubidFiles) -> std::io::Result<Option<Range>> {
    let mut taken = Vec::new();
    for f in files.both() {
        match std::fs::read_to_string(f) {
            Ok(t) => taken.extend(parse(&t).into_iter().map(|(_, r)| r)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    if !taken.iter().any(|r| r.overlaps(PREFERRED)) {
        return Ok(Some(PREFERRED));
    }
    taken.sort_by_key(|r| r.start);
    let mut best: Option<Range> = None;
    let mut at = LOW;
    for r in taken.iter().copied().chain([Range {
        start: ID_END,
        count: 0,
    }]) {
        if r.start > at {
            let gap = Range {
                start: at,
                count: r.start.min(ID_END) - at,
            };
            if best.is_none_or(|b| gap.count > b.count) {
                best = Some(gap);
            }
        }
        at = at.max(r.end());
    }
    Ok(best.filter(|g| g.count >= ONE_CONTAINER).map(|g| Range {
        start: g.start,
        count: g.count.min(PREFERRED.count),
    }))
}

/// Adds `owner:range` to `file` in place of it, atomically: the other lines stay as they
/// were, the file keeps its owner and mode, and shadow's lock (`FILE.lock`, as `usermod`
/// takes it) is held while it is rewritten.
pub fn add_range(file: &Path, owner: &str, range: Range) -> std::io::Result<()> {
    let lock = lock_path(file);
    let mut held = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&lock)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(std::io::Error::new(
                e.kind(),
                format!(
                    "{} exists: another program (usermod, useradd) is changing {}; try again when it is done",
                    lock.display(),
                    file.display()
                ),
            ))
        }
        Err(e) => return Err(e),
    };
    let result = (|| {
        writeln!(held, "{}", std::process::id())?;
        let (mut text, meta) = match std::fs::read_to_string(file) {
            Ok(t) => (t, Some(std::fs::metadata(file)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
            Err(e) => return Err(e),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("{owner}:{range}\n"));
        let tmp = file.with_file_name(format!(
            ".{}.cohort-tmp",
            file.file_name().unwrap_or_default().to_string_lossy()
        ));
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        out.write_all(text.as_bytes())?;
        if let Some(m) = &meta {
            out.set_permissions(std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
            std::os::unix::fs::fchown(&out, Some(m.uid()), Some(m.gid()))?;
        }
        out.sync_all()?;
        drop(out);
        std::fs::rename(&tmp, file)
    })();
    let _ = std::fs::remove_file(&lock);
    result
}

fn lock_path(file: &Path) -> PathBuf {
    let mut name = file.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    file.with_file_name(name)
}

/// Gives `containers` a range in each file that has none (the same free range in both).
/// Returns what it added, per file; nothing when both had one.
pub fn setup_containers(files: &SubidFiles) -> std::io::Result<Vec<(PathBuf, Range)>> {
    let Verdict::Missing(missing) = check(files, CONTAINERS)? else {
        return Ok(Vec::new());
    };
    let range = free_range(files)?.ok_or_else(|| {
        std::io::Error::other(format!(
            "no stretch of {ONE_CONTAINER} free ids is left in {} and {}",
            files.subuid.display(),
            files.subgid.display()
        ))
    })?;
    let mut added = Vec::new();
    for f in missing {
        add_range(&f, CONTAINERS, range)?;
        added.push((f, range));
    }
    Ok(added)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(dir: &Path, subuid: &str, subgid: &str) -> SubidFiles {
        let f = SubidFiles {
            subuid: dir.join("subuid"),
            subgid: dir.join("subgid"),
        };
        std::fs::write(&f.subuid, subuid).unwrap();
        std::fs::write(&f.subgid, subgid).unwrap();
        f
    }

    #[test]
    fn parses_ranges_and_skips_what_is_not_one() {
        let got = parse("alice:100000:65536\n\n# note\nbad line\nbob:x:1\ncontainers:2147483647:2147483648\n");
        assert_eq!(
            got,
            [
                (
                    "alice".to_string(),
                    Range {
                        start: 100_000,
                        count: 65_536
                    }
                ),
                ("containers".to_string(), PREFERRED),
            ]
        );
    }

    #[test]
    fn a_range_missing_from_either_file_is_named() {
        let d = tempfile::tempdir().unwrap();
        let f = files(
            d.path(),
            "alice:100000:65536\ncontainers:1000000:70000\n",
            "alice:100000:65536\n",
        );
        match check(&f, CONTAINERS).unwrap() {
            Verdict::Missing(m) => assert_eq!(m, std::slice::from_ref(&f.subgid)),
            v => panic!("{v:?}"),
        }
        std::fs::write(&f.subgid, "containers:2000000:65536\n").unwrap();
        assert!(matches!(
            check(&f, CONTAINERS).unwrap(),
            Verdict::Present { ids: 65_536 }
        ));
        // A missing file has no ranges (shadow creates it on the first usermod).
        std::fs::remove_file(&f.subuid).unwrap();
        assert!(matches!(check(&f, CONTAINERS).unwrap(), Verdict::Missing(m) if m == [f.subuid.clone()]));
    }

    #[test]
    fn setup_adds_the_preferred_range_keeping_every_other_line() {
        let d = tempfile::tempdir().unwrap();
        // No newline at the end, a comment, and another owner: all kept.
        let before = "# kept\nalice:100000:65536";
        let f = files(d.path(), before, "alice:100000:65536\n");
        std::fs::set_permissions(&f.subuid, std::fs::Permissions::from_mode(0o640)).unwrap();
        let added = setup_containers(&f).unwrap();
        assert_eq!(added, [(f.subuid.clone(), PREFERRED), (f.subgid.clone(), PREFERRED)]);
        assert_eq!(
            std::fs::read_to_string(&f.subuid).unwrap(),
            "# kept\nalice:100000:65536\ncontainers:2147483647:2147483648\n"
        );
        assert_eq!(std::fs::metadata(&f.subuid).unwrap().mode() & 0o777, 0o640);
        assert!(matches!(check(&f, CONTAINERS).unwrap(), Verdict::Present { .. }));
        // Idempotent: a second setup changes nothing.
        let text = std::fs::read_to_string(&f.subgid).unwrap();
        assert!(setup_containers(&f).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(&f.subgid).unwrap(), text);
        assert!(!d.path().join("subuid.lock").exists());
        let names: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
    }

    #[test]
    fn setup_picks_a_range_that_overlaps_none_present() {
        let d = tempfile::tempdir().unwrap();
        // Someone holds part of the upper half in one file only: it counts for both.
        let f = files(
            d.path(),
            "alice:100000:65536\n",
            "alice:100000:65536\nbig:3000000000:10\nlow:1048576:100\n",
        );
        let added = setup_containers(&f).unwrap();
        let r = added[0].1;
        assert_eq!(added.len(), 2);
        assert_eq!(added[1].1, r, "one range for both files");
        for (_, taken) in parse("alice:100000:65536\nbig:3000000000:10\nlow:1048576:100\n") {
            assert!(!r.overlaps(taken), "{r} overlaps {taken}");
        }
        assert!(r.count >= ONE_CONTAINER && r.end() <= ID_END, "{r}");
        // The largest free stretch (between `low` and `big`), as much of it as podman's own.
        assert_eq!(
            r,
            Range {
                start: 1_048_676,
                count: PREFERRED.count
            }
        );
    }

    #[test]
    fn setup_refuses_when_nothing_is_free_and_while_shadow_holds_the_lock() {
        let d = tempfile::tempdir().unwrap();
        let f = files(d.path(), "all:0:4294967295\n", "");
        let e = setup_containers(&f).unwrap_err();
        assert!(e.to_string().contains("no stretch of 65536 free ids"), "{e}");
        assert_eq!(std::fs::read_to_string(&f.subgid).unwrap(), "", "nothing written");

        let f = files(d.path(), "", "");
        std::fs::write(d.path().join("subuid.lock"), "1\n").unwrap();
        let e = setup_containers(&f).unwrap_err();
        assert!(e.to_string().contains("usermod"), "{e}");
        assert!(
            d.path().join("subuid.lock").exists(),
            "someone else's lock is left alone"
        );
        assert_eq!(std::fs::read_to_string(&f.subuid).unwrap(), "");
    }
}
