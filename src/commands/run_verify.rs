//! The verify gate's settings for `run`, `resume`, `retry` and `serve`: `--verify` over
//! `[verify]` over what the run was started with.

use anyhow::Result;

use crate::cli::usage;
use crate::config::{parse_duration, Config};
use crate::run::{CacheSpec, VerifySettings};

/// Resolves the verify settings once: flags > trusted config > stored run options.
pub fn verify_settings(
    flag: Option<&str>,
    config: &Config,
    stored: &serde_json::Value,
) -> Result<Option<VerifySettings>> {
    let stored = &stored["verify"];
    let argv: Option<Vec<String>> = match (flag, &config.verify.command) {
        (Some(line), _) => Some(
            shlex::split(line).ok_or_else(|| usage(format!("cannot parse --verify {line:?}: unbalanced quotes")))?,
        ),
        (None, Some(argv)) => Some(argv.clone()),
        (None, None) => serde_json::from_value(stored["argv"].clone()).ok(),
    };
    let Some(argv) = argv else {
        return Ok(None);
    };
    if argv.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(usage(
            "the verify command is empty; pass --verify 'PROGRAM ARGS…' or set [verify] command = [\"cargo\", \"test\"]",
        ));
    }
    let timeout = match &config.verify.timeout {
        Some(t) => Some(parse_duration("[verify] timeout", t)?),
        None => stored["timeout_secs"].as_u64().map(std::time::Duration::from_secs),
    };
    let retries = config
        .verify
        .retries
        .or(stored["retries"].as_u64().map(|r| r as u32))
        .unwrap_or(2);
    if retries > 20 {
        return Err(usage(format!(
            "[verify] retries = {retries}: at most 20 feedback rounds per task"
        )));
    }
    let merged = config.verify.merged.or(stored["merged"].as_bool()).unwrap_or(true);
    let written: Vec<String> = match &config.verify.caches {
        Some(c) => c.clone(),
        None => serde_json::from_value(stored["caches"].clone()).unwrap_or_default(),
    };
    let caches = written
        .iter()
        .map(|c| CacheSpec::parse(c).map_err(|e| usage(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    Ok(Some(VerifySettings {
        argv,
        timeout,
        retries,
        merged,
        caches,
    }))
}

/// On the host, the verify command inherits cohort's environment: a `CARGO_TARGET_DIR`
/// there makes cargo build elsewhere than the `target` cache, which then stays cold (and
/// parallel verify runs share that one directory).
pub fn warn_about_environment(v: &VerifySettings, runtime: &str) {
    let target_cache = v
        .caches
        .iter()
        .any(|c| c.at == crate::runtime::CachePath::Workdir("target".into()));
    if runtime == "host" && target_cache && std::env::var_os("CARGO_TARGET_DIR").is_some() {
        crate::progress::say(
            "cohort: warning: CARGO_TARGET_DIR is set, so cargo in the verify command builds there and not in \
             the [verify] cache \"target\"; unset it for the run to use the cache",
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_over_config_over_stored() {
        let mut config = Config::default();
        let stored =
            serde_json::json!({"verify": {"argv": ["old"], "retries": 5, "merged": false, "caches": ["target"]}});
        let v = verify_settings(None, &config, &stored).unwrap().unwrap();
        assert_eq!(
            (v.argv.clone(), v.retries, v.merged, v.caches.len()),
            (vec!["old".to_string()], 5, false, 1)
        );
        config.verify.command = Some(vec!["cargo".into(), "test".into()]);
        config.verify.retries = Some(1);
        let v = verify_settings(None, &config, &stored).unwrap().unwrap();
        assert_eq!((v.argv[0].as_str(), v.retries), ("cargo", 1));
        let v = verify_settings(Some("make 'check all'"), &config, &stored)
            .unwrap()
            .unwrap();
        assert_eq!(v.argv, ["make", "check all"]);
        assert!(verify_settings(Some("'open"), &config, &stored).is_err());
        assert!(verify_settings(None, &Config::default(), &serde_json::json!({}))
            .unwrap()
            .is_none());
        config.verify.caches = Some(vec!["../x".into()]);
        assert!(verify_settings(None, &config, &stored).is_err());
    }
}
