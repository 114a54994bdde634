//! `cohort gc [--keep-runs N] [--older-than AGE] [--dry-run]`

use anyhow::Result;

use crate::run::gc::{self, GcOptions, Item};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Keep the newest N runs whatever their age.
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub keep_runs: usize,
    /// Keep runs that finished less than AGE ago (e.g. 30d, 12h), whatever their number.
    #[arg(long, value_name = "AGE", default_value = "30d")]
    pub older_than: String,
    /// List what would go and the bytes it would free; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: the listing as one JSON document (runs kept and removed with their
    /// items, loose objects, the image store) rather than lines.
    #[arg(long, requires = "dry_run", conflicts_with = "checkouts")]
    pub json: bool,
    /// Also remove the checkouts kept between runs (`[run] keep_checkouts`, the service's
    /// pool) that no running cohort holds; the next run writes them anew.
    #[arg(long)]
    pub checkouts: bool,
}

/// Bytes as people read them: 1536 -> "1.5 KiB".
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{n} B"),
        _ => format!("{v:.1} {}", UNITS[unit]),
    }
}

/// One line per removed thing; the same for `--dry-run` and a real gc, so the two compare.
fn line(item: &Item) -> String {
    match item {
        Item::Ref { name, why, .. } => format!("  ref {name} ({why})"),
        Item::Dir { path, bytes } => format!("  dir {} ({})", path.display(), human_bytes(*bytes)),
        Item::Rows => "  rows in the state DB".into(),
        Item::CodexHome { path, bytes } => format!("  codex-home {} ({})", path.display(), human_bytes(*bytes)),
    }
}

pub fn run(args: Args) -> Result<u8> {
    let older_than = crate::config::parse_duration("--older-than", &args.older_than)?;
    let paths = crate::git::RepoPaths::discover(&std::env::current_dir()?)?;
    if args.json {
        let opts = GcOptions {
            keep_runs: args.keep_runs,
            older_than,
        };
        println!("{}", serde_json::to_string_pretty(&dry_run_json(&paths, opts)?)?);
        return Ok(0);
    }
    image_blobs(args.dry_run)?;
    if !crate::run::state_path(&paths).exists() {
        println!("no cohort runs here; nothing to collect");
        return Ok(0);
    }
    let (paths, state) = super::open_state()?;
    let opts = GcOptions {
        keep_runs: args.keep_runs,
        older_than,
    };
    let plan = gc::plan(&paths, &state, opts, std::time::SystemTime::now())?;
    if args.checkouts {
        kept_checkouts(&paths, args.dry_run)?;
    }
    if args.dry_run {
        for run in &plan.runs {
            if let Some(why) = &run.kept {
                println!("keep run {} ({why})", run.run_id);
            } else {
                println!("remove run {}", run.run_id);
            }
            for item in &run.items {
                println!("{}", line(item));
            }
            for (name, why) in &run.kept_refs {
                println!("  keep {name} ({why})");
            }
        }
        let (loose, bytes, threshold) = gc::loose_objects(&paths)?;
        match threshold {
            Some(t) if loose >= t && loose > 0 => println!(
                "would pack {loose} loose object(s) ({}) into one pack (gc.auto {t})",
                human_bytes(bytes)
            ),
            Some(t) => println!("{loose} loose object(s): fewer than gc.auto ({t}), left loose"),
            None => println!("{loose} loose object(s): gc.auto is 0, left loose"),
        }
        println!(
            "dry run: would free {} (nothing was changed)",
            human_bytes(plan.bytes())
        );
        return Ok(0);
    }
    let outcome = gc::apply(&paths, &state, &plan)?;
    let mut current: Option<&str> = None;
    for (run, item) in &outcome.removed {
        if current != Some(run.as_str()) {
            println!("run {run}");
            current = Some(run);
        }
        println!("{}", line(item));
    }
    for run in plan.runs.iter().filter(|r| !r.kept_refs.is_empty()) {
        for (name, why) in &run.kept_refs {
            println!("kept {name} of run {} ({why})", run.run_id);
        }
    }
    for (run, why) in &outcome.skipped {
        println!("skipped run {run}: {why}");
    }
    for run in plan.runs.iter().filter(|r| r.held) {
        println!("left run {} alone: a cohort process is working on it", run.run_id);
    }
    println!(
        "freed {}; packed {} ref(s) into packed-refs",
        human_bytes(outcome.bytes()),
        outcome.packed
    );
    if let Some(p) = &outcome.objects {
        println!(
            "packed {} loose object(s) into {} ({}; the loose files took {})",
            p.objects,
            p.pack.display(),
            human_bytes(p.pack_bytes),
            human_bytes(p.freed)
        );
    }
    if outcome.stale_pack_dirs > 0 {
        println!(
            "removed {} temporary pack director(ies) a killed gc left in .git/objects",
            outcome.stale_pack_dirs
        );
    }
    if let Some(e) = &outcome.objects_error {
        eprintln!("warning: loose objects were not packed (nothing was lost; the next gc tries again): {e}");
    }
    if let Some(e) = &outcome.pack_error {
        eprintln!("warning: refs were not packed (nothing was lost; the next gc tries again): {e}");
    }
    Ok(0)
}

/// The image builder's blobs no recorded tag uses (the store is the user's, not the
/// repository's: one for every repository this user builds images in).
fn image_blobs(dry_run: bool) -> Result<()> {
    use crate::runtime::image_store::{collect, Collected};
    use cohort_oci::UnusedKind;
    let dir = super::image::image_cache_dir()?.join("blobs");
    match collect(&dir, dry_run)? {
        Collected::NoStore => {}
        Collected::Busy => println!(
            "image store {}: an image build is in progress; left alone",
            dir.display()
        ),
        Collected::NoTags { blobs } => println!(
            "image store {}: {blobs} blob(s) but no tag recorded (built by an older cohort); left \
             alone. Build the image once more (`cohort image build`) to record its tag.",
            dir.display()
        ),
        Collected::Unused { tags, items, bytes } => {
            let verb = if dry_run { "would remove" } else { "removed" };
            println!(
                "image store {} ({tags} tag(s) recorded): {verb} {} item(s), {}",
                dir.display(),
                items.len(),
                human_bytes(bytes)
            );
            for u in &items {
                let what = match &u.kind {
                    UnusedKind::Blob(d) => format!("blob {d}"),
                    UnusedKind::Temp => format!("temporary file {}", u.path.display()),
                    UnusedKind::LayerCache => format!("layer-cache entry {}", u.path.display()),
                };
                println!("  {what} ({})", human_bytes(u.bytes));
            }
        }
    }
    Ok(())
}

fn item_json(item: &Item) -> serde_json::Value {
    use serde_json::json;
    match item {
        Item::Ref { name, id, why } => json!({"kind": "ref", "name": name, "id": id.to_string(), "why": why}),
        Item::Dir { path, bytes } => json!({"kind": "dir", "path": path, "bytes": bytes}),
        Item::Rows => json!({"kind": "rows"}),
        Item::CodexHome { path, bytes } => json!({"kind": "codex_home", "path": path, "bytes": bytes}),
    }
}

/// `--dry-run --json`: what gc would do, changing nothing.
fn dry_run_json(paths: &crate::git::RepoPaths, opts: GcOptions) -> Result<serde_json::Value> {
    use crate::runtime::image_store::{collect, Collected};
    use cohort_oci::UnusedKind;
    use serde_json::json;
    let dir = super::image::image_cache_dir()?.join("blobs");
    let image = match collect(&dir, true)? {
        Collected::NoStore => json!(null),
        Collected::Busy => json!({"path": dir, "state": "busy"}),
        Collected::NoTags { blobs } => json!({"path": dir, "state": "no_tags", "blobs": blobs}),
        Collected::Unused { tags, items, bytes } => json!({
            "path": dir,
            "state": "ok",
            "tags": tags,
            "bytes": bytes,
            "remove": items.iter().map(|u| {
                let (kind, digest) = match &u.kind {
                    UnusedKind::Blob(d) => ("blob", Some(d.clone())),
                    UnusedKind::Temp => ("temporary_file", None),
                    UnusedKind::LayerCache => ("layer_cache_entry", None),
                };
                json!({"kind": kind, "digest": digest, "path": u.path, "bytes": u.bytes})
            }).collect::<Vec<_>>(),
        }),
    };
    let (loose, loose_bytes, threshold) = gc::loose_objects(paths)?;
    let objects = json!({
        "loose": loose,
        "bytes": loose_bytes,
        "gc_auto": threshold,
        "would_pack": threshold.is_some_and(|t| loose > 0 && loose >= t),
    });
    if !crate::run::state_path(paths).exists() {
        return Ok(json!({"runs": [], "bytes": 0, "objects": objects, "image_store": image}));
    }
    let (paths, state) = super::open_state()?;
    let plan = gc::plan(&paths, &state, opts, std::time::SystemTime::now())?;
    let runs: Vec<serde_json::Value> = plan
        .runs
        .iter()
        .map(|r| {
            json!({
                "run_id": r.run_id,
                "remove": r.kept.is_none(),
                "kept": r.kept,
                "held": r.held,
                "items": r.items.iter().map(item_json).collect::<Vec<_>>(),
                "kept_refs": r.kept_refs.iter().map(|(name, why)| json!({"name": name, "why": why})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(json!({"runs": runs, "bytes": plan.bytes(), "objects": objects, "image_store": image}))
}

/// `--checkouts`: the kept pool's slots, removed (or listed) unless a run holds them.
fn kept_checkouts(paths: &crate::git::RepoPaths, dry_run: bool) -> Result<()> {
    // Sizes first: a removed slot has none left to measure.
    let sizes: Vec<u64> = crate::git::pool::kept_slots(&paths.cohort_dir(), false)?
        .iter()
        .map(|k| k.dirs.iter().map(|d| gc::disk_usage(d)).sum())
        .collect();
    let slots = crate::git::pool::kept_slots(&paths.cohort_dir(), !dry_run)?;
    let verb = if dry_run { "would remove" } else { "removed" };
    for (k, bytes) in slots.iter().zip(sizes) {
        match k.busy {
            true => println!("kept checkout {} (a running cohort holds it)", k.dirs[0].display()),
            false => println!("{verb} checkout {} ({})", k.dirs[0].display(), human_bytes(bytes)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_read_well() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(1536), "1.5 KiB");
        assert_eq!(super::human_bytes(3 * 1024 * 1024), "3.0 MiB");
    }
}
