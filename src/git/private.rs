//! A task's private git dir: the git dir the agent's own git uses instead of the repository's.
//!
//! The checkout's `.git` file points here. It holds what git needs to work on the task
//! branch (HEAD, the branch in `packed-refs`, a copy of cohort's index, a small config) and
//! reaches the repository's objects through `objects/info/alternates`, which a container
//! mounts read-only. The agent may write anything here: new objects, refs, hooks, config. None
//! of it is trusted: cohort never opens this directory as a repository (no config, hooks or
//! filters from it run), it reads only the task head, by hand, and imports only the objects
//! reachable from it (see `import`). Before each task the directory is put back to exactly
//! what cohort writes, in place, so a reused slot costs a few small writes.

use std::ffi::OsStr;
use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::ByteSlice;

use super::safefs::{Dir, Kind};
use super::Oid;

/// The names cohort keeps at the top of a private git dir; anything else is removed.
const KEEP: [&str; 6] = ["HEAD", "config", "index", "objects", "packed-refs", "refs"];

/// What the agent's git is set up with.
pub struct Setup<'a> {
    /// `refs/heads/...`: the task branch, HEAD's target.
    pub branch_ref: &'a str,
    pub base: Oid,
    /// cohort's index of the checkout at `base`, so `git status` starts clean.
    pub index: &'a [u8],
    /// The repository's object store (what `objects/info/alternates` names).
    pub objects: &'a Path,
    /// The identity for the agent's own commits.
    pub name: &'a str,
    pub email: &'a str,
}

/// Makes the private git dir at `path` hold exactly what `setup` says.
pub fn prepare(path: &Path, setup: &Setup<'_>) -> Result<()> {
    let (parent, name) = split(path)?;
    let parent = Dir::open(parent).with_context(|| format!("cannot open {}", path.display()))?;
    let dir = parent.make_dir(name)?;
    let err = || format!("cannot set up the private git dir {}", path.display());
    for (entry, _) in dir.entries().with_context(err)? {
        if !KEEP.iter().any(|k| OsStr::new(k) == entry) {
            dir.remove(&entry).with_context(err)?;
        }
    }
    let objects = dir.make_dir(OsStr::new("objects")).with_context(err)?;
    clear_except(&objects, &["info"]).with_context(err)?;
    let info = objects.make_dir(OsStr::new("info")).with_context(err)?;
    clear_except(&info, &["alternates"]).with_context(err)?;
    let refs = dir.make_dir(OsStr::new("refs")).with_context(err)?;
    clear_except(&refs, &[]).with_context(err)?;

    let alternates = format!("{}\n", setup.objects.display());
    info.write_file(OsStr::new("alternates"), alternates.as_bytes(), 0o644)
        .with_context(err)?;
    let head = format!("ref: {}\n", setup.branch_ref);
    dir.write_file(OsStr::new("HEAD"), head.as_bytes(), 0o644)
        .with_context(err)?;
    let packed = format!(
        "# pack-refs with: peeled fully-peeled sorted \n{} {}\n",
        setup.base, setup.branch_ref
    );
    dir.write_file(OsStr::new("packed-refs"), packed.as_bytes(), 0o644)
        .with_context(err)?;
    dir.write_file(OsStr::new("config"), config(setup.name, setup.email).as_bytes(), 0o644)
        .with_context(err)?;
    dir.write_file(OsStr::new("index"), setup.index, 0o644)
        .with_context(err)?;
    Ok(())
}

/// The agent's git config. `checkStat = minimal`: in a container the checkout's owner shows
/// under another id, and the index copied from cohort's would otherwise look stale throughout.
fn config(name: &str, email: &str) -> String {
    format!(
        "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\tcheckStat = minimal\n\
         [user]\n\tname = {}\n\temail = {}\n",
        quote(name),
        quote(email)
    )
}

/// A git config value in double quotes (no line breaks can reach it).
fn quote(v: &str) -> String {
    let clean: String = v.chars().filter(|c| !c.is_control()).collect();
    format!("\"{}\"", clean.replace('\\', "\\\\").replace('"', "\\\""))
}

fn clear_except(dir: &Dir, keep: &[&str]) -> std::io::Result<()> {
    for (entry, _) in dir.entries()? {
        if !keep.iter().any(|k| OsStr::new(k) == entry) {
            dir.remove(&entry)?;
        }
    }
    Ok(())
}

fn split(path: &Path) -> Result<(&Path, &OsStr)> {
    match (path.parent(), path.file_name()) {
        (Some(p), Some(n)) => Ok((p, n)),
        _ => anyhow::bail!("{} is not a private git dir path", path.display()),
    }
}

/// The most a ref file is read.
const MAX_REF_FILE: u64 = 4096;
/// The most of `packed-refs` read.
const MAX_PACKED_REFS: u64 = 16 * 1024 * 1024;

/// The commit the agent left as its head: HEAD, or the branch it names (loose or packed),
/// read without following anything. `None` when there is none or it is not readable as one:
/// what is there is the agent's, so oddities mean "no commits of its own", not an error.
pub fn read_head(path: &Path) -> Result<Option<Oid>> {
    let Ok(dir) = Dir::open(path) else { return Ok(None) };
    let Some(head) = dir.read_small(OsStr::new("HEAD"), MAX_REF_FILE)? else {
        return Ok(None);
    };
    let head = head.trim();
    let Some(target) = head.strip_prefix(b"ref:") else {
        return Ok(parse_oid(head));
    };
    let name = target.trim();
    // Only a plain branch name: no `..`, no absolute paths, nothing git itself would refuse.
    if !name.starts_with(b"refs/heads/") || gix::validate::reference::name(name.as_bstr()).is_err() {
        return Ok(None);
    }
    if let Some((file, _)) = dir.open_beneath(super::rela_path(name.as_bstr()))? {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_REF_FILE), &mut bytes)?;
        return Ok(parse_oid(bytes.trim()));
    }
    let Some((file, _)) = dir.open_file(OsStr::new("packed-refs"))? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PACKED_REFS), &mut bytes)?;
    Ok(bytes.lines().find_map(|line| {
        let (oid, rest) = line.split_once_str(b" ")?;
        (rest == name).then(|| parse_oid(oid)).flatten()
    }))
}

fn parse_oid(hex: &[u8]) -> Option<Oid> {
    Oid::from_hex(hex).ok()
}

/// Makes the private object store safe to read as an object database: only directories and
/// regular files stay (a symlink or FIFO there could lead a reader elsewhere or block it),
/// and the agent's alternates go (objects must come from this store alone). Returns its path
/// and total size.
pub fn sanitize_objects(path: &Path) -> Result<(std::path::PathBuf, u64)> {
    let objects = path.join("objects");
    let dir = Dir::open(path)?;
    let Some(store) = dir.sub(OsStr::new("objects"))? else {
        return Ok((objects, 0));
    };
    if let Some(info) = store.sub(OsStr::new("info"))? {
        for name in ["alternates", "http-alternates"] {
            info.remove(OsStr::new(name))?;
        }
    }
    let mut total = 0;
    sanitize(&store, 0, &mut total).with_context(|| format!("cannot check {}", objects.display()))?;
    Ok((objects, total))
}

fn sanitize(dir: &Dir, depth: usize, total: &mut u64) -> std::io::Result<()> {
    for (name, kind) in dir.entries()? {
        match kind {
            Kind::File => {
                if let Some(st) = dir.stat(&name)? {
                    *total += st.st_size as u64;
                }
            }
            // Git's object store is two levels deep (objects/ab/..., objects/pack/...).
            Kind::Dir if depth < 2 => {
                if let Some(sub) = dir.sub(&name)? {
                    sanitize(&sub, depth + 1, total)?;
                }
            }
            _ => dir.remove(&name)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prepared_then_put_back_after_an_agent() {
        let tmp = tempfile::tempdir().unwrap();
        let g = tmp.path().join("git");
        let base = Oid::from_hex(b"1111111111111111111111111111111111111111").unwrap();
        let setup = Setup {
            branch_ref: "refs/heads/cohort/task/r/001-x",
            base,
            index: b"DIRC-index",
            objects: Path::new("/repo/.git/objects"),
            name: "A \"quoted\" name",
            email: "a@example.com",
        };
        prepare(&g, &setup).unwrap();
        assert_eq!(read_head(&g).unwrap(), Some(base));
        assert_eq!(
            std::fs::read_to_string(g.join("objects/info/alternates")).unwrap(),
            "/repo/.git/objects\n"
        );
        // The agent's leftovers: hooks, a loose ref, an object, a symlinked config.
        std::fs::create_dir_all(g.join("hooks")).unwrap();
        std::fs::write(g.join("hooks/pre-commit"), "#!/bin/sh\n").unwrap();
        std::fs::create_dir_all(g.join("refs/heads/cohort/task/r")).unwrap();
        let moved = "2222222222222222222222222222222222222222";
        std::fs::write(g.join("refs/heads/cohort/task/r/001-x"), format!("{moved}\n")).unwrap();
        assert_eq!(read_head(&g).unwrap().unwrap().to_string(), moved, "a loose ref wins");
        std::fs::create_dir_all(g.join("objects/ab")).unwrap();
        std::fs::write(g.join("objects/ab/cd"), "x").unwrap();
        std::fs::remove_file(g.join("config")).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, g.join("config")).unwrap();
        prepare(&g, &setup).unwrap();
        assert!(!g.join("hooks").exists());
        assert!(!g.join("objects/ab").exists());
        assert!(!g.join("refs/heads").exists());
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert!(std::fs::read_to_string(g.join("config"))
            .unwrap()
            .contains("checkStat = minimal"));
        assert_eq!(read_head(&g).unwrap(), Some(base));
        // HEAD outside refs/heads, or a symlink, or a FIFO: no head of the agent's.
        std::fs::write(g.join("HEAD"), "ref: ../../etc/passwd\n").unwrap();
        assert_eq!(read_head(&g).unwrap(), None);
        std::fs::remove_file(g.join("HEAD")).unwrap();
        nix::unistd::mkfifo(&g.join("HEAD"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_head(&g).unwrap(), None);
        // Sanitizing the store drops symlinks and alternates.
        std::fs::create_dir_all(g.join("objects/ef")).unwrap();
        std::os::unix::fs::symlink("/dev/zero", g.join("objects/ef/01")).unwrap();
        let (_, total) = sanitize_objects(&g).unwrap();
        assert_eq!(total, 0);
        assert!(!g.join("objects/ef/01").exists() && !g.join("objects/info/alternates").exists());
    }
}
