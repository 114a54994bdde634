//! `cohort image push REF [--tag T] [--tls-verify=false]`: the image `cohort image build`
//! recorded in cohort's blob store, pushed to a registry over the distribution API
//! (cohort-oci's `push`), in-process. Only the blobs the registry lacks are uploaded.
//! Credentials come from containers' auth files (`podman login` writes them), never argv.

use std::path::Path;

use anyhow::{Context, Result};

use crate::cli::usage;
use crate::config::Config;
use crate::git::RepoPaths;
use crate::runtime::podman::DEFAULT_IMAGE;

#[derive(clap::Args, Debug)]
pub struct PushArgs {
    /// Where to push: HOST[:PORT]/NAME[:TAG] (tag `latest` when left out).
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The built image to push (default: [image] tag, else localhost/cohort:latest).
    #[arg(long, value_name = "TAG")]
    pub tag: Option<String>,
    /// `--tls-verify=false`: accept a registry certificate no CA vouches for, and speak plain
    /// HTTP to a registry without TLS (a registry on this machine or a private network).
    #[arg(
        long,
        value_name = "BOOL",
        default_value_t = true,
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set
    )]
    pub tls_verify: bool,
}

pub async fn push(args: PushArgs, config_path: Option<&Path>) -> Result<u8> {
    let reference = cohort_oci::Reference::parse(&args.reference).map_err(usage)?;
    let cwd = std::env::current_dir()?;
    let repo = RepoPaths::discover(&cwd).ok();
    let config = Config::load(config_path, repo.as_ref().map(|p| p.workdir.as_path()))?;
    let tag = args
        .tag
        .clone()
        .or(config.image.tag.clone())
        .unwrap_or_else(|| DEFAULT_IMAGE.into());
    let store_dir = super::image::image_cache_dir()?.join("blobs");
    let no_image = || {
        usage(format!(
            "no image {tag} in cohort's image store ({}): build it with `cohort image build{}`",
            store_dir.display(),
            if args.tag.is_some() {
                format!(" --tag {tag}")
            } else {
                String::new()
            }
        ))
    };
    if !store_dir.join("blobs").is_dir() {
        return Err(no_image());
    }
    // Shared, as a build holds it: gc must not remove the blobs while they are sent.
    let _lock = crate::runtime::image_store::lock_for_build(&store_dir)?;
    let store = cohort_oci::BlobStore::open(&store_dir)
        .with_context(|| format!("cannot open the image store {}", store_dir.display()))?;
    let tags = store.tags().context("cannot read the image store's index.json")?;
    let Some((manifest_digest, _)) = tags.get(&tag).cloned() else {
        return Err(no_image());
    };
    let files = cohort_oci::auth::auth_files();
    let credentials = cohort_oci::auth::credentials_for(&files, &reference).map_err(usage)?;
    let options = cohort_oci::PushOptions {
        insecure: !args.tls_verify,
        credentials,
    };
    eprintln!(
        "cohort: pushing {tag} ({manifest_digest}) to {reference}{}",
        if options.credentials.is_some() {
            " with the credentials of an auth file"
        } else {
            ""
        }
    );
    let started = std::time::Instant::now();
    let report = tokio::task::spawn_blocking({
        let reference = reference.clone();
        move || cohort_oci::push(&store, &manifest_digest, &reference, &options, &mut report_progress)
    })
    .await?
    .with_context(|| format!("cannot push {tag} to {reference}"))?;
    eprintln!(
        "cohort: pushed in {:.1}s over {}",
        started.elapsed().as_secs_f64(),
        report.scheme
    );
    println!("{reference}");
    println!("digest {}", report.manifest_digest);
    println!("id {}", report.config_digest);
    // The reference that names exactly this image: what `cohort k8s manifests --image` takes.
    println!(
        "pinned {}/{}@{}",
        reference.registry, reference.repository, report.manifest_digest
    );
    println!(
        "blobs pushed {} ({} bytes), already there {} ({} bytes)",
        report.pushed, report.pushed_bytes, report.existed, report.existed_bytes
    );
    Ok(0)
}

/// One stderr line per blob: a first push of ~400 MB takes a while, and a second one shows
/// that nothing was sent again.
fn report_progress(e: cohort_oci::PushEvent<'_>) {
    let mb = |b: u64| b as f64 / 1e6;
    match e {
        cohort_oci::PushEvent::Blob { digest, size, pushed } => eprintln!(
            "cohort:   {} {:.1} MB {}",
            short(digest),
            mb(size),
            if pushed { "pushed" } else { "already there" }
        ),
        cohort_oci::PushEvent::Manifest { digest, .. } => eprintln!("cohort:   manifest {} stored", short(digest)),
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
