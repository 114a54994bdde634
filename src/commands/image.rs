//! `cohort image build [--tag T] [--copy-system]`: the agent image, from scratch, in-process.
//!
//! Layers (cohort-oci): (a) host programs with their shared libraries (`[image] programs`, or
//! a shell, coreutils basics, git and CA certificates), (b) the codex binary at
//! `/usr/local/bin/codex` when one is found, (c) this cohort binary, without its debug
//! sections, at `/usr/local/bin/cohort`, (d) tracked repository files matching
//! `[image] include` under `/opt/cohort/repo`. Only files in the index are taken, so ignored
//! and untracked files (a `.env`, build output) never reach the image. Labelled with HEAD's commit. Reproducible: mtimes are SOURCE_DATE_EPOCH,
//! or HEAD's commit time when that is unset.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::config::Config;
use crate::git::RepoPaths;
use crate::runtime::podman::{Podman, DEFAULT_IMAGE};

/// Where repository files go in the image.
pub const REPO_DIR: &str = "/opt/cohort/repo";
/// The rootful socket `--copy-system` loads into, unless `--system-socket` says otherwise.
pub const SYSTEM_SOCKET: &str = "/run/podman/podman.sock";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: ImageCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ImageCommand {
    /// Build the agent image from scratch and load it into podman (no podman or buildah binary is run).
    Build(BuildArgs),
    /// Load an oci-archive written by `image build --archive` into podman (e.g. into a user's
    /// storage, without building again).
    Load(LoadArgs),
    /// Push the built image to a registry (HOST[:PORT]/NAME[:TAG]) over the distribution API;
    /// only the layers it lacks are sent. Credentials: containers' auth.json (`podman login`).
    Push(super::image_push::PushArgs),
}

#[derive(clap::Args, Debug)]
pub struct LoadArgs {
    /// The oci-archive.
    pub archive: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// The image name (default: [image] tag, else localhost/cohort:latest).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// Also load the image into root's storage through the rootful socket (for a system service).
    #[arg(long)]
    pub copy_system: bool,
    /// The rootful socket --copy-system loads into: a system engine with non-default sockets,
    /// or a second engine for testing.
    #[arg(long, value_name = "PATH", env = "COHORT_SYSTEM_SOCKET", default_value = SYSTEM_SOCKET)]
    pub system_socket: PathBuf,
    /// Also keep the oci-archive at FILE.
    #[arg(long, value_name = "FILE")]
    pub archive: Option<PathBuf>,
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    match args.command {
        ImageCommand::Build(b) => build(b, config_path).await,
        ImageCommand::Load(l) => load(l).await,
        ImageCommand::Push(p) => super::image_push::push(p, config_path).await,
    }
}

async fn load(args: LoadArgs) -> Result<u8> {
    if !args.archive.is_file() {
        return Err(usage(format!("{} is not a file", args.archive.display())));
    }
    let podman = Podman::connect().await?;
    podman.load_image(&args.archive).await.with_context(|| {
        format!(
            "cannot load {} into podman ({})",
            args.archive.display(),
            podman.describe()
        )
    })?;
    eprintln!("cohort: loaded {} into {}", args.archive.display(), podman.describe());
    Ok(0)
}

/// Tracked files (index entries that are regular files) matching any of `globs`.
/// A glob without `/` also matches a file's name in any directory.
pub fn tracked_files(paths: &RepoPaths, globs: &[String]) -> Result<Vec<String>> {
    if globs.is_empty() {
        return Ok(Vec::new());
    }
    let repo = paths.open()?;
    let index = repo.index_or_empty().context("cannot read the repository index")?;
    let mode = gix::glob::wildmatch::Mode::NO_MATCH_SLASH_LITERAL;
    let mut out = Vec::new();
    for e in index.entries() {
        if !matches!(
            e.mode,
            gix::index::entry::Mode::FILE | gix::index::entry::Mode::FILE_EXECUTABLE
        ) {
            continue;
        }
        let path = e.path(&index);
        let name = path.rsplit(|b| *b == b'/').next().unwrap_or(path);
        let hit = globs.iter().any(|g| {
            let g = g.trim_start_matches('/');
            gix::glob::wildmatch(g.as_bytes().into(), path, mode)
                || (!g.contains('/') && gix::glob::wildmatch(g.as_bytes().into(), name.into(), mode))
        });
        if hit {
            out.push(path.to_string());
        }
    }
    out.sort();
    Ok(out)
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

async fn build(args: BuildArgs, config_path: Option<&Path>) -> Result<u8> {
    let paths = RepoPaths::discover(&std::env::current_dir()?)?;
    let config = Config::load(config_path, Some(&paths.workdir))?;
    let tag = args
        .tag
        .clone()
        .or(config.image.tag.clone())
        .unwrap_or_else(|| DEFAULT_IMAGE.into());
    if tag.trim().is_empty() || tag.contains(char::is_whitespace) {
        return Err(usage(format!("--tag {tag:?} is not an image name")));
    }
    // Connect first: a missing socket should fail before a build of several seconds.
    let podman = Podman::connect().await?;
    let system_socket = args.system_socket.clone();
    let same = |a: &Path, b: Option<&Path>| {
        b.is_some_and(|b| a.canonicalize().ok().is_some_and(|a| b.canonicalize().ok() == Some(a)))
    };
    // Already talking to the rootful engine (CONTAINER_HOST names it): one load is enough.
    let system = if args.copy_system && !same(&system_socket, podman.socket()) {
        if !system_socket.exists() {
            return Err(usage(format!(
                "--copy-system: no rootful podman socket at {}; start it with \
                 `sudo systemctl enable --now podman.socket` (or name another with --system-socket)",
                system_socket.display()
            )));
        }
        let system = Podman::connect_to(&system_socket).await?;
        if system.rootless() {
            return Err(usage(format!(
                "--copy-system: {} is a rootless podman, not root's storage",
                system_socket.display()
            )));
        }
        Some(system)
    } else {
        None
    };

    let repo = paths.open()?;
    let head = repo.head_commit().ok();
    let commit = head.as_ref().map(|c| c.id.to_string());
    let epoch = cohort_oci::source_date_epoch_from_env()
        .or_else(|| {
            head.as_ref()
                .and_then(|c| c.time().ok())
                .map(|t| t.seconds.max(0) as u64)
        })
        .unwrap_or(0);

    let codex = match crate::agent::codex::find_codex(config.agent.codex_path.as_deref()) {
        Ok(p) if is_elf(&p) => Some((p, "/usr/local/bin/codex".to_string())),
        Ok(p) => {
            eprintln!(
                "cohort: warning: {} is not a static codex binary (a launcher script?); building without codex",
                p.display()
            );
            None
        }
        Err(e) => {
            eprintln!("cohort: warning: building without codex: {e}");
            None
        }
    };
    let cohort = std::env::current_exe().context("cannot find the running cohort binary")?;
    let files: Vec<(PathBuf, String)> = tracked_files(&paths, config.image.include.as_deref().unwrap_or(&[]))?
        .into_iter()
        .map(|rel| (paths.workdir.join(&rel), format!("{REPO_DIR}/{rel}")))
        .filter(|(host, _)| host.is_file())
        .collect();

    // Outside the repository: the builder may be root building for a repository another
    // user owns (the system service), and must not leave root-owned files in its .git.
    let work = image_cache_dir()?;
    std::fs::create_dir_all(&work).with_context(|| format!("cannot create {}", work.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix("build-")
        .tempdir_in(&work)
        .with_context(|| format!("cannot create a temporary directory in {}", work.display()))?;
    // Without its DWARF: ~130 MB of a release cohort's ~170 MB, of no use inside a container.
    let cohort = cohort_oci::stripped_copy(&cohort, &work.join("stripped"))
        .with_context(|| format!("cannot copy {} without its debug sections", cohort.display()))?;
    let base = match &config.image.base {
        Some(name) => {
            let out = tmp.path().join("base.tar");
            podman
                .export_image(name, &out)
                .await
                .with_context(|| format!("cannot export [image] base {name}"))?;
            Some(out)
        }
        None => None,
    };
    let mut settings = cohort_oci::ImageSettings {
        source_commit: commit.clone(),
        ..Default::default()
    };
    settings.labels.insert("cohort.image".into(), "agent".into());
    let spec = cohort_oci::BuildSpec {
        programs: config
            .image
            .programs
            .clone()
            .unwrap_or_else(cohort_oci::default_programs),
        codex,
        cohort: Some((cohort, "/usr/local/bin/cohort".into())),
        files,
        settings,
        base,
        source_date_epoch: epoch,
        // Stored (level 0) gzip: the archive goes straight to a local engine, and podman
        // unpacks stored blocks much faster than compressed ones. Measured with this image
        // (codex, git): podman load 8 s against 15 s at level 1, and cohort saves the ~5 s of
        // compressing; the price is a blob cache about twice as large.
        compression: 0,
        ..Default::default()
    };
    // The layers the engine already holds, from the previous build under this tag: the
    // archive it is sent leaves their blobs out (see write_oci_archive_without), so a rebuild
    // after a one-file change sends one small layer rather than ~400 MB.
    let known: Vec<String> = match podman.image_inspect_raw(&tag).await {
        Ok(raw) => raw["RootFS"]["Layers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Err(_) => Vec::new(),
    };
    let started = std::time::Instant::now();
    let full = tmp.path().join("image.tar");
    let partial = tmp.path().join("changed-layers.tar");
    let store_dir = work.join("blobs");
    // Until the tag is recorded below, gc must not take this build's blobs (see image_store).
    let _store_lock = crate::runtime::image_store::lock_for_build(&store_dir)?;
    // A complete archive is written only when something needs one: a first build, another
    // engine to load into (--copy-system), or --archive.
    let need_full = system.is_some() || args.archive.is_some();
    let (image, spec, omit) = tokio::task::spawn_blocking({
        let (full, partial, store_dir) = (full.clone(), partial.clone(), store_dir.clone());
        move || -> Result<_> {
            let store = cohort_oci::BlobStore::open(&store_dir)?;
            let image = cohort_oci::build_with_progress(&spec, &store, &mut report_progress)?;
            crate::runtime::image_store::record_tag(&store, &tag, &image)?;
            let omit: Vec<String> = image
                .layers
                .iter()
                .filter(|l| known.contains(&l.diff_id))
                .map(|l| l.digest.clone())
                .collect();
            let t = std::time::Instant::now();
            let epoch = spec.source_date_epoch;
            if !omit.is_empty() {
                cohort_oci::write_oci_archive_without(&store, &image, &tag, &partial, epoch, &omit)?;
            }
            if omit.is_empty() || need_full {
                cohort_oci::write_oci_archive(&store, &image, &tag, &full, epoch)?;
            }
            eprintln!("cohort: wrote the oci-archive in {:.1}s", t.elapsed().as_secs_f64());
            Ok((image, (spec, tag), omit))
        }
    })
    .await??;
    let (spec, tag) = spec;
    let t = std::time::Instant::now();
    eprintln!(
        "cohort: loading {tag} into podman ({}){}…",
        podman.describe(),
        if omit.is_empty() {
            String::new()
        } else {
            format!(", {} of {} layers already there", omit.len(), image.layers.len())
        }
    );
    let loaded = if omit.is_empty() {
        podman.load_image(&full).await
    } else {
        match podman.load_image(&partial).await {
            Ok(v) => Ok(v),
            // The engine did not have a layer after all (removed meanwhile, or stored from
            // another compression of the same content): send everything.
            Err(e) => {
                eprintln!("cohort: the engine lacks a layer it had before ({e}); loading the whole image");
                if !full.exists() {
                    let (store_dir, full, tag, image) = (store_dir, full.clone(), tag.clone(), image.clone());
                    let epoch = spec.source_date_epoch;
                    tokio::task::spawn_blocking(move || {
                        let store = cohort_oci::BlobStore::open(&store_dir)?;
                        cohort_oci::write_oci_archive(&store, &image, &tag, &full, epoch)
                    })
                    .await??;
                }
                podman.load_image(&full).await
            }
        }
    };
    loaded.with_context(|| format!("cannot load the image into podman ({})", podman.describe()))?;
    eprintln!("cohort: loaded in {:.1}s", t.elapsed().as_secs_f64());
    let archive = full;
    if let Some(system) = &system {
        system
            .load_image(&archive)
            .await
            .with_context(|| format!("cannot load the image through {}", system_socket.display()))?;
    }
    if let Some(keep) = &args.archive {
        std::fs::copy(&archive, keep).with_context(|| format!("cannot write {}", keep.display()))?;
    }
    eprintln!(
        "cohort: built {tag} in {:.1}s ({} layers{}{})",
        started.elapsed().as_secs_f64(),
        image.layers.len(),
        if spec.codex.is_some() { ", with codex" } else { "" },
        if system.is_some() || (args.copy_system && !podman.rootless()) {
            "; also loaded into root's storage"
        } else {
            ""
        },
    );
    println!("{tag}");
    println!("digest {}", image.manifest_digest);
    println!("id {}", image.image_id());
    if let Some(c) = commit {
        println!("commit {c}");
    }
    Ok(0)
}

/// One stderr line per layer step: a cold build with codex is silent for several seconds
/// otherwise (compressing ~300 MB), and a rebuild shows which layers were reused.
fn report_progress(p: cohort_oci::Progress<'_>) {
    const MB: f64 = 1e6;
    match p {
        cohort_oci::Progress::Layer {
            index,
            count,
            name,
            entries,
            bytes,
        } => eprintln!(
            "cohort: layer {}/{count} {name}: {entries} entries, {:.1} MB…",
            index + 1,
            bytes as f64 / MB
        ),
        cohort_oci::Progress::LayerDone { reused: true, .. } => eprintln!("cohort:   unchanged, reused"),
        cohort_oci::Progress::LayerDone { layer, elapsed, .. } => eprintln!(
            "cohort:   {:.1} MB compressed in {:.1}s",
            layer.size as f64 / MB,
            elapsed.as_secs_f64()
        ),
    }
}

/// The builder's cache (layer blobs reused between builds, and scratch space):
/// `$XDG_CACHE_HOME/cohort/image`, default `~/.cache/cohort/image`.
pub(crate) fn image_cache_dir() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        // No HOME (a systemd unit, sudo -i variants): the user database knows it.
        .or_else(|| {
            let me = nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten()?;
            Some(me.dir.join(".cache"))
        })
        .ok_or_else(|| usage("neither XDG_CACHE_HOME nor HOME is set: nowhere to keep the image cache"))?;
    Ok(base.join("cohort/image"))
}
