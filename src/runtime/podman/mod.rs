//! A client for podman's libpod REST API (hyper 1, no podman binary), over its unix socket
//! or, for a podman host elsewhere, TCP or ssh ([`Endpoint`]).
//!
//! Self-contained on purpose: it depends only on external crates, so the rest of the crate
//! can evolve around it. The `Runtime` trait implementation lives elsewhere and uses this.
//!
//! Why hyper directly rather than the `podman-api` crate: we need the exit code of `wait`
//! (podman-api drops it), per-exec environment (the API key's only route into a container),
//! the upgraded bidirectional stream of `exec start` for interactive shells, streaming uploads
//! for `images/load`, and the exact libpod v4 create spec; a dozen small typed calls over
//! hyper are less code than working around a generated client.

mod client;
pub mod connections;
mod endpoint;
mod error;
mod exec;
pub mod idmap;
mod known_hosts;
mod pull;
pub mod runtime;
mod ssh;
mod stream;
mod transport;
mod types;
mod volume;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_caches;
#[cfg(test)]
mod tests_parallel;
#[cfg(test)]
mod tests_rootful;

pub use client::{socket_candidates, Podman, API_PREFIX};
pub use endpoint::{Endpoint, SshTarget};
pub use error::{PodmanError, Result};
pub use pull::{SecretInfo, SecretSpec};
pub use runtime::{cleanup_run, PodmanRuntime, PodmanSettings, DEFAULT_IMAGE, WORKSPACE};
pub use stream::{demux, ExecSession, Frame, StreamKind};
pub use types::*;
pub use volume::VolumeInspect;
