//! A spawn's caches (`[verify] caches`) in a task container: one podman named volume each,
//! labelled `cohort=cache`, created when first needed and never removed by cohort's cleanup
//! (removing a container with `v=true` removes only its anonymous volumes). Mounted at the
//! workspace or the image user's home joined with the cache's relative path.
//!
//! Ownership. What the command's user is on the host depends on the mode: rootless `keep-id`
//! maps the image user onto the invoking user; rootful `userns=auto` with the owner pinned
//! maps it onto the checkout's owner, and in the host user namespace the command runs as the
//! owner itself (all stable); rootful `userns=auto` with idmapped views gives each container
//! its own unprivileged range, so the image user's host id may differ from one container to
//! the next (a range is free again once its container is removed, in the background). Podman 4.3 chowns a new volume to
//! the container's user once, on its first mount (`NeedsChown`); the next container of
//! another range would find the files of the first owned by a stranger, readable but not
//! writable. So every volume is mounted with `U`: at each start podman walks the volume and
//! lchowns whatever is not owned by this container's user (its host id, through the
//! container's mapping) to it. In the stable modes the walk changes nothing after the first
//! time; under `userns=auto` it hands the cache over to the new range. It also heals a volume
//! last used in another mode (the root CLI with idmapped views, then the hardened service
//! with the owner pinned). Podman's own `idmap` volume option would avoid the chown, but
//! podman 4.3 leaves it to the OCI runtime and runc before 1.2 ignores it (see `idmap`); an
//! idmapped view of the volume's directory made by cohort would work only where cohort can
//! make them, and podman would then not know the volume is in use.
//!
//! Mount points. For a cache in the workspace cohort makes the (empty) mount-point
//! directories in the checkout itself, owned by the checkout's owner: left to the OCI runtime,
//! it would make them as the container's root, i.e. a subordinate id in the user's checkout
//! (rootless) or fail on the idmapped view, where the container's root has no id.
//!
//! Not solved: a home cache's parents that the image lacks (`~/.cargo` of `~/.cargo/registry`)
//! are made by the OCI runtime as the container's root, so the command cannot write beside
//! the cache in them (cargo's `~/.cargo/.package-cache` lock). The image should carry them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path};

use anyhow::{Context, Result};

use super::super::VolumeMount;
use super::{PodmanRuntime, WORKSPACE};
use crate::runtime::{CachePath, Spawn};

/// The label every cache volume carries (`cohort=cache`).
pub const CACHE_LABEL: (&str, &str) = ("cohort", "cache");

impl PodmanRuntime {
    /// The spawn's caches as volume mounts, their mount points made in the checkout. Fails,
    /// before anything is created, on a cache path that is not a plain relative path.
    pub(super) fn cache_volumes(&self, spawn: &Spawn, owner: (u32, u32)) -> Result<Vec<VolumeMount>> {
        let mut volumes = Vec::new();
        for cache in &spawn.caches {
            let destination = match &cache.at {
                CachePath::Workdir(rel) => format!("{WORKSPACE}/{}", relative(rel)?),
                CachePath::Home(rel) => {
                    let rel = relative(rel)?;
                    let home = self.image_home.as_deref().with_context(|| {
                        format!(
                            "the image {} sets no HOME, which the cache ~/{rel} needs",
                            self.settings.image
                        )
                    })?;
                    format!("{}/{rel}", home.trim_end_matches('/'))
                }
            };
            volumes.push(VolumeMount {
                name: cache.volume.clone(),
                destination,
                options: vec!["U".into()],
            });
        }
        for cache in &spawn.caches {
            if let CachePath::Workdir(rel) = &cache.at {
                mount_point(&spawn.workdir, rel, owner)?;
            }
        }
        Ok(volumes)
    }

    /// Creates the spawn's cache volumes that do not exist yet; existing ones are kept.
    pub(super) async fn ensure_caches(&self, spawn: &Spawn) -> Result<()> {
        let labels: BTreeMap<String, String> = [CACHE_LABEL].map(|(k, v)| (k.to_string(), v.to_string())).into();
        for cache in &spawn.caches {
            self.podman
                .ensure_volume(&cache.volume, &labels)
                .await
                .with_context(|| format!("cannot create the cache volume {}", cache.volume))?;
        }
        Ok(())
    }
}

/// A cache path relative to the workspace or home, as `a/b`: no root, no `..`, not empty,
/// UTF-8. A cache must stay inside what it is relative to and must not cover all of it.
pub(super) fn relative(rel: &Path) -> Result<String> {
    let mut parts = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(p) => parts.push(
                p.to_str()
                    .with_context(|| format!("cache path {} is not UTF-8", rel.display()))?,
            ),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                anyhow::bail!("cache path {} is absolute; it must be relative", rel.display())
            }
            Component::ParentDir => {
                anyhow::bail!("cache path {} contains `..`; it must stay inside", rel.display())
            }
        }
    }
    anyhow::ensure!(
        !parts.is_empty(),
        "cache path {:?} names no directory",
        rel.display().to_string()
    );
    Ok(parts.join("/"))
}

/// Makes `checkout/rel` (and what leads to it) a directory owned by `owner`, without
/// following symlinks: the checkout is the agent's, and a `target -> /etc` it left must not
/// make cohort create directories elsewhere on the host. An existing directory is kept as
/// it is (the volume covers its content); anything else in the way is an error.
fn mount_point(checkout: &Path, rel: &Path, owner: (u32, u32)) -> Result<()> {
    let mut dir = checkout.to_path_buf();
    for part in relative(rel)?.split('/') {
        dir.push(part);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => continue,
            Ok(_) => anyhow::bail!(
                "cannot mount the cache {}: {} in the checkout is not a directory",
                rel.display(),
                dir.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", dir.display())),
        }
        std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let m = std::fs::symlink_metadata(&dir).with_context(|| format!("cannot read {}", dir.display()))?;
        if (m.uid(), m.gid()) != owner {
            std::os::unix::fs::lchown(&dir, Some(owner.0), Some(owner.1))
                .with_context(|| format!("cannot give {} to the checkout's owner", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_paths_stay_inside() {
        assert_eq!(relative(Path::new("target")).unwrap(), "target");
        assert_eq!(relative(Path::new("./a/b/")).unwrap(), "a/b");
        for bad in ["/abs", "a/../../b", "..", "", "."] {
            assert!(relative(Path::new(bad)).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mount_points_do_not_follow_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let me = (unsafe { libc::geteuid() }, unsafe { libc::getegid() });
        let co = tmp.path().join("co");
        std::fs::create_dir(&co).unwrap();
        mount_point(&co, Path::new("a/b"), me).unwrap();
        assert!(co.join("a/b").is_dir());
        mount_point(&co, Path::new("a/b"), me).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, co.join("link")).unwrap();
        let err = mount_point(&co, Path::new("link/x"), me).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err:#}");
        assert!(!outside.join("x").exists());
    }
}
