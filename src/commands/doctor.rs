//! `cohort doctor [--scope user|system]`: checks what the service needs on this host and
//! says how to fix each problem. Exit 0 when everything needed is there, 1 otherwise. The
//! checks are `service::host`'s, the same `service install` refuses on.

use std::path::Path;

use anyhow::Result;

use crate::service::host::{self, Level};
use crate::service::subid::SubidFiles;
use crate::service::ServiceScope;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Which service to check for (default: system for root, user otherwise).
    #[arg(long, value_enum)]
    pub scope: Option<ServiceScope>,
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    let scope = args.scope.unwrap_or_else(ServiceScope::default_for_caller);
    let root = crate::git::RepoPaths::discover(&std::env::current_dir()?)
        .ok()
        .map(|p| p.workdir);
    let loaded = crate::config::Sources::new(scope, config_path, root.as_deref()).load()?;
    println!("checking for the {} service", scope.as_str());
    let checks = host::check(&host::Host {
        scope,
        config: &loaded.config,
        untrusted: loaded.untrusted.as_ref(),
        subids: SubidFiles::etc(),
        lingering: true,
    })
    .await;
    let mut failed = 0;
    for c in &checks {
        match c.level {
            Level::Ok => println!("ok    {}: {}", c.what, c.detail),
            Level::Note => println!("note  {}: {}", c.what, c.detail),
            Level::Fail => {
                failed += 1;
                println!("FAIL  {}: {}\n      fix: {}", c.what, c.detail, c.fix);
            }
        }
    }
    if failed == 0 {
        println!("all checks passed");
        Ok(0)
    } else {
        println!("{failed} problem(s) found");
        Ok(1)
    }
}
