//! The pack a push sends: the objects reachable from the new tips and not
//! from what the remote advertised, written with gix-pack's generator.
//!
//! Commits come from a walk from the tips with the remote's commits hidden.
//! gix-pack expands each into its tree's additions compared to its parents
//! (`TreeAdditionsComparedToAncestor`): unchanged subtrees and files are the
//! parent's, so the remote has them or they come with an earlier commit of
//! the walk. That expansion also lists the parents themselves and their
//! trees; those of the boundary (parents outside the walk) are the remote's
//! and are left out again with all they hold, as is anything else it
//! advertised.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

use gix::error::ErrorExt;
use gix::parallel::InOrderIter;
use gix_pack::data::output::{self, count::PackLocation, entry::iter_from_counts};

use super::{describe, short, Oid, PushError};

/// Objects to send, and the object database handle to read them with.
pub(super) struct Counted {
    counts: Vec<output::Count>,
    db: gix::odb::Handle,
}

impl Counted {
    pub(super) fn len(&self) -> usize {
        self.counts.len()
    }
}

pub(super) enum WriteError {
    Interrupted,
    Pack(String),
}

/// Works out the objects to send for `tips` (ref name, new value), given
/// the object ids the remote advertised (`remote_has`). Without `ofs_delta`
/// on the remote, nothing is copied from local packs as a delta.
pub(super) fn count(
    repo: &gix::Repository,
    tips: &[(&str, Oid)],
    remote_has: &[Oid],
    ofs_delta: bool,
    interrupt: &AtomicBool,
) -> Result<Counted, PushError> {
    let pack_error = |what: &str, err: &(dyn std::error::Error + 'static)| {
        if interrupt.load(Ordering::Relaxed) {
            PushError::Interrupted
        } else {
            PushError::Pack {
                message: format!("{what}: {}", describe(err)),
            }
        }
    };

    // What the remote has that we have too: its commits bound the walk, and
    // none of its objects goes into the pack. Ids we lack (the remote moved
    // on since our last fetch) cannot be walked and need no leaving out.
    let mut known: HashSet<Oid> = HashSet::new();
    let mut hidden = Vec::new();
    for &id in remote_has {
        if let Ok(Some(header)) = repo.try_find_header(id) {
            known.insert(id);
            match header.kind() {
                gix::object::Kind::Commit => hidden.push(id),
                // receive-pack advertises annotated tags unpeeled; what they
                // point to is the remote's too.
                gix::object::Kind::Tag => {
                    if let Ok(target) = repo.find_object(id).and_then(|o| o.peel_tags_to_end()) {
                        if target.kind == gix::object::Kind::Commit {
                            hidden.push(target.id);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    // Annotated tags are sent as they are, the commits they point to walked.
    let mut tags = Vec::new();
    let mut commits_to_walk = Vec::new();
    for &(name, new) in tips {
        let mut id = new;
        loop {
            let not_here = |_| PushError::InvalidUpdate {
                name: name.to_string(),
                reason: format!("{} is not in the local repository", short(id)),
            };
            match repo.find_header(id).map_err(not_here)?.kind() {
                gix::object::Kind::Commit => {
                    commits_to_walk.push(id);
                    break;
                }
                gix::object::Kind::Tag => {
                    tags.push(id);
                    id = repo
                        .find_tag(id)
                        .and_then(|tag| tag.target_id())
                        .map_err(|err| pack_error("cannot read a tag", &err))?
                        .detach();
                }
                kind => {
                    return Err(PushError::InvalidUpdate {
                        name: name.to_string(),
                        reason: format!("{} is a {kind}, not a commit", short(new)),
                    })
                }
            }
        }
    }

    let walk = repo
        .rev_walk(commits_to_walk)
        .with_hidden(hidden)
        .all()
        .map_err(|err| pack_error("cannot walk the commits to push", &err))?;
    let mut commits = Vec::new();
    let mut parents = Vec::new();
    for info in walk {
        if interrupt.load(Ordering::Relaxed) {
            return Err(PushError::Interrupted);
        }
        let info = info.map_err(|err| pack_error("cannot walk the commits to push", &err))?;
        commits.push(info.id);
        parents.extend(info.parent_ids.iter().copied());
    }
    // The boundary: parents outside the walk, so the remote's. Like git's
    // pack-objects, everything in their trees is left out, wherever the pack
    // would hold it (a file a merge brings from the remote's side, say).
    let walked: HashSet<Oid> = commits.iter().copied().collect();
    let mut boundary = HashSet::new();
    let mut trees = Vec::new();
    for parent in parents.into_iter().filter(|p| !walked.contains(p)) {
        if boundary.insert(parent) {
            known.insert(parent);
            if let Ok(tree) = repo.find_commit(parent).and_then(|c| c.tree_id()) {
                trees.push(tree.detach());
            }
        }
    }
    while let Some(id) = trees.pop() {
        if interrupt.load(Ordering::Relaxed) {
            return Err(PushError::Interrupted);
        }
        if !known.insert(id) {
            continue; // seen under another boundary commit
        }
        let tree = repo
            .find_tree(id)
            .map_err(|err| pack_error("cannot read a tree the remote has", &err))?;
        for entry in tree.iter() {
            let entry = entry.map_err(|err| pack_error("cannot read a tree the remote has", &err))?;
            let (mode, oid) = (entry.mode(), entry.oid().to_owned());
            if mode.is_tree() {
                trees.push(oid);
            } else if !mode.is_commit() {
                known.insert(oid);
            }
        }
    }

    // Counting reads many small objects in a row: one thread, the repository's
    // caches. Its order is deterministic that way, too.
    let mut db = repo.objects.clone().into_inner();
    db.prevent_pack_unload();
    db.ignore_replacements = true;
    let mut input = commits.into_iter().map(Ok);
    let (mut counts, _) = output::count::objects_unthreaded(
        &db,
        &mut input,
        &gix::progress::Discard,
        interrupt,
        output::count::objects::ObjectExpansion::TreeAdditionsComparedToAncestor,
    )
    .map_err(|err| pack_error("cannot list the objects to push", &err))?;
    counts.retain(|c| !known.contains(&c.id));
    let mut listed: HashSet<Oid> = counts.iter().map(|c| c.id).collect();
    for tag in tags {
        if !known.contains(&tag) && listed.insert(tag) {
            counts.push(output::Count::from_data(tag, None));
        }
    }
    if !ofs_delta {
        // Deltas copied from a local pack refer to their base by offset; a
        // remote without ofs-delta gets every object whole instead.
        for c in &mut counts {
            c.entry_pack_location = PackLocation::LookedUp(None);
        }
    }
    Ok(Counted { counts, db })
}

/// Streams the pack (version 2, with its trailing checksum) into `out`,
/// entries compressed a chunk at a time on all cores. Returns its size.
pub(super) fn write(
    repo: &gix::Repository,
    counted: Counted,
    out: &mut dyn Write,
    interrupt: &AtomicBool,
) -> Result<u64, WriteError> {
    let hash = repo.object_hash();
    let version = gix_pack::data::Version::V2;
    let pack_error = |err: &(dyn std::error::Error + 'static)| WriteError::Pack(describe(err));
    let num_entries =
        u32::try_from(counted.counts.len()).map_err(|_| WriteError::Pack("too many objects for one pack".into()))?;
    if num_entries == 0 {
        // Still a pack: receive-pack expects one after any non-delete command.
        let empty = std::iter::empty::<gix::Result<Vec<output::Entry>>>();
        return drive(
            output::bytes::FromEntriesIter::new(empty, out, 0, version, hash),
            interrupt,
        );
    }
    let compression = repo.pack_compression().map_err(|err| pack_error(&err))?;
    let entries = iter_from_counts(
        counted.counts,
        counted.db,
        Box::new(gix::progress::Discard),
        iter_from_counts::Options {
            thread_limit: None,
            mode: iter_from_counts::Mode::PackCopyAndBaseObjects,
            // A thin pack's bases must be on the remote; a delta's base in a
            // local pack need not be, so every delta's base is in the pack.
            allow_thin_pack: false,
            chunk_size: 16,
            version,
            compression,
        },
    )
    .map_err(|err| pack_error(&err))?;
    // Chunks come back from the threads in any order; a pack's entries must
    // be in order (a delta follows its base).
    let in_order = InOrderIter::from(entries).map(|chunk| {
        chunk.and_then(|entries| {
            // An object listed but gone would leave the pack short of the
            // count in its header.
            if entries.iter().any(output::Entry::is_invalid) {
                Err(gix::error::message("an object to push is missing from the local repository").raise())
            } else {
                Ok(entries)
            }
        })
    });
    drive(
        output::bytes::FromEntriesIter::new(in_order, out, num_entries, version, hash),
        interrupt,
    )
}

fn drive<I, W>(mut entries: output::bytes::FromEntriesIter<I, W>, interrupt: &AtomicBool) -> Result<u64, WriteError>
where
    I: Iterator<Item = gix::Result<Vec<output::Entry>>>,
    W: Write,
{
    let mut bytes = 0;
    // Stopped only before the trailing checksum: a pack cut short is refused
    // by the remote, a whole one may already be taken.
    while entries.digest().is_none() {
        if interrupt.load(Ordering::Relaxed) {
            return Err(WriteError::Interrupted);
        }
        match entries.next() {
            Some(written) => bytes += written.map_err(|err| WriteError::Pack(describe(&err)))?,
            None => break,
        }
    }
    Ok(bytes)
}
