//! cohort: a request document becomes tasks; each task runs an agent on its
//! own branch and checkout and is merged into a service branch.
//!
//! The CLI (`cli`, `commands/`) only drives this library. The flow is a
//! straight line: `plan` → `git` (sync, service branch) → `run` (pool of
//! checkouts, `runtime` × `agent`, commit, merge).

pub mod agent;
pub mod cli;
mod commands;
pub mod config;
pub mod gateway;
pub mod git;
pub mod keys;
mod lockfile;
pub mod models;
pub mod plan;
pub mod progress;
pub mod remote;
pub mod run;
pub mod runtime;
pub mod secret;
pub mod service;
pub mod trust;
