//! Taking an agent's own commits into the repository without trusting its object store.
//!
//! Only objects reachable from the agent's head that the repository lacks are copied, each
//! one checked on the way: its size against the limit before it is read, its content hashed
//! again (it must be the object its id names), parsed as what it claims to be, and tree
//! entries checked to be names git would accept in a checkout (no `.git`, `..`, or `/`). The
//! walk stops at objects the repository already has. Then the caller moves the task branch
//! by compare-and-swap, as for any commit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;

use anyhow::{Context, Result};
use gix::bstr::ByteSlice;
use gix::objs::{Find, FindHeader, Write};

use super::scan::StreamScan;
use super::Oid;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Imported {
    pub objects: usize,
    pub bytes: u64,
}

/// What an import may take in.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The largest object.
    pub max_object: u64,
    /// All objects of one import together.
    pub max_total: u64,
}

/// Copies the objects reachable from `head` in the private store at `objects` (already
/// sanitized) that `repo` does not have. Each is shown to `scan` before it is written; on the
/// first secret the import stops, and that object is not written.
pub fn import(
    repo: &gix::Repository,
    objects: &Path,
    head: Oid,
    limits: Limits,
    scan: &mut StreamScan,
) -> Result<Imported> {
    let mut done = Imported::default();
    if repo.has_object(head) {
        return Ok(done);
    }
    let store = gix::odb::at(objects, repo.object_hash())
        .with_context(|| format!("cannot open the agent's object store {}", objects.display()))?;
    let mut queue = VecDeque::from([head]);
    let mut seen = HashSet::from([head]);
    // Where a blob or tree sits in a commit's tree, to name it in a finding.
    let mut paths: HashMap<Oid, String> = HashMap::new();
    let mut buf = Vec::new();
    while let Some(id) = queue.pop_front() {
        let header = store
            .try_header(&id)
            .ok()
            .flatten()
            .with_context(|| format!("object {id} is missing from the agent's git"))?;
        anyhow::ensure!(
            header.size <= limits.max_object,
            "object {id} is {} bytes, over the limit of {} ([run] max_file_size)",
            header.size,
            limits.max_object
        );
        done.bytes += header.size;
        anyhow::ensure!(
            done.bytes <= limits.max_total,
            "the agent's new objects are over {} bytes",
            limits.max_total
        );
        let data = store
            .try_find(&id, &mut buf)
            .ok()
            .flatten()
            .with_context(|| format!("object {id} in the agent's git cannot be read"))?;
        let (kind, bytes) = (data.kind, data.data);
        let actual = gix::objs::compute_hash(repo.object_hash(), kind, bytes)?;
        anyhow::ensure!(
            actual == id,
            "object {id} in the agent's git holds other content ({actual})"
        );
        let here = paths.get(&id).cloned();
        let label = match &here {
            Some(p) if !p.is_empty() => p.clone(),
            _ => format!("{kind} {id}"),
        };
        scan.chunk(label.as_bytes(), bytes);
        anyhow::ensure!(scan.found.is_empty(), "the agent's commits hold secrets ({label})");
        let mut next = |child: Oid| {
            if seen.insert(child) && !repo.has_object(child) {
                queue.push_back(child);
            }
        };
        match kind {
            gix::objs::Kind::Commit => {
                let c = gix::objs::CommitRef::from_bytes(bytes, repo.object_hash())
                    .with_context(|| format!("commit {id} is malformed"))?;
                next(c.tree());
                c.parents().for_each(&mut next);
            }
            gix::objs::Kind::Tree => {
                let t = gix::objs::TreeRef::from_bytes(bytes, repo.object_hash())
                    .with_context(|| format!("tree {id} is malformed"))?;
                for e in &t.entries {
                    check_name(e.filename, e.mode.is_link()).with_context(|| format!("tree {id}"))?;
                    // A submodule's commit lives in another repository.
                    if !e.mode.is_commit() {
                        let name = e.filename.to_str_lossy();
                        let path = match &here {
                            Some(p) if !p.is_empty() => format!("{p}/{name}"),
                            _ => name.into_owned(),
                        };
                        if e.mode.is_blob() {
                            scan.name(&path);
                        }
                        paths.entry(e.oid.to_owned()).or_insert(path);
                        next(e.oid.to_owned());
                    }
                }
                anyhow::ensure!(scan.found.is_empty(), "the agent's commits hold secrets");
            }
            gix::objs::Kind::Tag => {
                let t = gix::objs::TagRef::from_bytes(bytes, repo.object_hash())
                    .with_context(|| format!("tag {id} is malformed"))?;
                next(t.target());
            }
            gix::objs::Kind::Blob => {}
        }
        let written = repo.objects.write_buf(kind, bytes)?;
        anyhow::ensure!(written == id, "object {id} was stored as {written}");
        done.objects += 1;
    }
    Ok(done)
}

/// A tree entry name that a checkout can hold: not empty, `.` or `..`, no `/`, not `.git` in
/// any spelling a file system might fold to it.
pub fn check_name(name: &gix::bstr::BStr, symlink: bool) -> Result<()> {
    let options = gix::validate::path::component::Options {
        protect_windows: false,
        protect_hfs: true,
        protect_ntfs: true,
    };
    let mode = symlink.then_some(gix::validate::path::component::Mode::Symlink);
    gix::validate::path::component(name, mode, options)
        .map(|_| ())
        .with_context(|| format!("the name {:?} is not allowed in a tree", name.to_str_lossy()))
}
