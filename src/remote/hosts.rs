//! The podman hosts a run spreads its tasks over: `--host URL[=SLOTS]` (repeatable) or
//! `[run] hosts = ["URL[=SLOTS]", …]`. URL is what podman writes (`ssh://USER@HOST[:PORT]/
//! path/podman.sock`, `tcp://HOST:PORT`, `unix:///path`); a bare NAME is one of podman's
//! own connections (`podman system connection list`, see
//! [`crate::runtime::podman::connections`]). SLOTS is how many tasks run there at once.

use std::collections::BTreeSet;

use crate::runtime::podman::connections::Store;
use crate::runtime::podman::Endpoint;

/// Tasks a host runs at once when its spec names no number.
pub const DEFAULT_SLOTS: usize = 4;
/// The most a spec may ask for.
pub const MAX_SLOTS: usize = 64;

/// One podman host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    /// Unique among the run's hosts: the connection's name, or the URL's host (`-2`, `-3`
    /// added when two URLs share one).
    pub name: String,
    pub endpoint: Endpoint,
    pub slots: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("host {spec:?}: {message}")]
pub struct HostSpecError {
    pub spec: String,
    pub message: String,
}

fn err(spec: &str, message: impl Into<String>) -> HostSpecError {
    HostSpecError {
        spec: spec.to_owned(),
        message: message.into(),
    }
}

/// The slots a `URL[=SLOTS]` spec asks for, without resolving it (for the run's default
/// parallelism; [`HostSpec::parse`] checks the spec).
pub fn slots_of(spec: &str) -> usize {
    match spec.trim().rsplit_once('=') {
        Some((_, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n.parse().unwrap_or(DEFAULT_SLOTS),
        _ => DEFAULT_SLOTS,
    }
}

impl HostSpec {
    /// Parse one `URL[=SLOTS]` or `NAME[=SLOTS]`, looking NAMEs up in `store`. The name is
    /// not made unique here (see [`resolve_hosts`]).
    pub fn parse(spec: &str, store: &Store) -> Result<HostSpec, HostSpecError> {
        let s = spec.trim();
        // `=DIGITS` at the end is the slot count; an `=` inside a URL's query is not.
        let (target, slots) = match s.rsplit_once('=') {
            Some((t, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                let n: usize = n
                    .parse()
                    .map_err(|_| err(spec, format!("{n} slots is not a number from 1 to {MAX_SLOTS}")))?;
                if !(1..=MAX_SLOTS).contains(&n) {
                    return Err(err(spec, format!("{n} slots: give 1 to {MAX_SLOTS}")));
                }
                (t, n)
            }
            Some((_, n)) if !s.contains("://") || n.is_empty() => {
                return Err(err(
                    spec,
                    format!("{n:?} after = is not a slot count (1 to {MAX_SLOTS})"),
                ))
            }
            _ => (s, DEFAULT_SLOTS),
        };
        if target.is_empty() {
            return Err(err(spec, "no URL or connection name"));
        }
        if target.contains("://") || target.starts_with("unix:") {
            let endpoint = Endpoint::parse(target).map_err(|e| err(spec, e.to_string()))?;
            let name = match &endpoint {
                Endpoint::Unix(_) => "local".to_owned(),
                e => e.host(),
            };
            return Ok(HostSpec { name, endpoint, slots });
        }
        if !target
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-@".contains(&b))
        {
            return Err(err(
                spec,
                "neither a URL (ssh://USER@HOST/path/podman.sock, tcp://HOST:PORT) nor a podman connection name",
            ));
        }
        let conn = store.lookup(target).map_err(|e| err(spec, e.to_string()))?;
        let endpoint = conn.endpoint().map_err(|e| err(spec, e.to_string()))?;
        Ok(HostSpec {
            name: target.to_owned(),
            endpoint,
            slots,
        })
    }
}

/// The run's hosts: the `--host` flags when any are given (config's list is then ignored
/// entirely), else `[run] hosts`. Names of podman connections are read from podman's files
/// ([`Store::from_env`]). Empty: no remote hosts.
pub fn resolve_hosts(flags: &[String], config: &[String]) -> Result<Vec<HostSpec>, HostSpecError> {
    resolve_hosts_in(flags, config, &Store::from_env())
}

/// [`resolve_hosts`] with the connection files given.
pub fn resolve_hosts_in(flags: &[String], config: &[String], store: &Store) -> Result<Vec<HostSpec>, HostSpecError> {
    let specs = if flags.is_empty() { config } else { flags };
    let mut taken = BTreeSet::new();
    let mut out = Vec::with_capacity(specs.len());
    for spec in specs {
        let mut host = HostSpec::parse(spec, store)?;
        if out.iter().any(|h: &HostSpec| h.endpoint == host.endpoint) {
            return Err(err(
                spec,
                format!("{} is given twice; give it once with more slots", host.endpoint),
            ));
        }
        let base = host.name.clone();
        let mut n = 2;
        while taken.contains(&host.name) {
            host.name = format!("{base}-{n}");
            n += 1;
        }
        taken.insert(host.name.clone());
        out.push(host);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn store(dir: &std::path::Path) -> Store {
        let json = dir.join("podman-connections.json");
        std::fs::write(
            &json,
            r#"{"Connection":{"Default":"w1","Connections":{"w1":{"URI":"ssh://core@10.0.0.5/run/user/1000/podman/podman.sock","Identity":"/k/w1"}}}}"#,
        )
        .unwrap();
        Store {
            json: Some(json),
            confs: vec![],
        }
    }

    #[test]
    fn specs_slots_and_names() {
        let d = tempfile::tempdir().unwrap();
        let st = store(d.path());
        let hosts = resolve_hosts_in(
            &strs(&[
                "ssh://root@10.0.0.2:2222/run/podman/podman.sock=8",
                "tcp://10.0.0.2:8888",
                "w1=2",
                "tcp://10.0.0.2:8889=1",
                "ssh://u@h/run/podman/podman.sock?secure=true",
            ]),
            &strs(&["tcp://ignored:1"]),
            &st,
        )
        .unwrap();
        let got: Vec<(&str, usize)> = hosts.iter().map(|h| (h.name.as_str(), h.slots)).collect();
        assert_eq!(
            got,
            [
                ("10.0.0.2", 8),
                ("10.0.0.2-2", 4),
                ("w1", 2),
                ("10.0.0.2-3", 1),
                ("h", 4)
            ]
        );
        let Endpoint::Ssh(t) = &hosts[2].endpoint else { panic!() };
        assert_eq!(t.identity, Some(PathBuf::from("/k/w1")));
        // No flags: config's list.
        let hosts = resolve_hosts_in(&[], &strs(&["w1"]), &st).unwrap();
        assert_eq!((hosts[0].name.as_str(), hosts[0].slots), ("w1", DEFAULT_SLOTS));
        assert!(resolve_hosts_in(&[], &[], &st).unwrap().is_empty());
    }

    #[test]
    fn bad_specs_say_why() {
        let d = tempfile::tempdir().unwrap();
        let st = store(d.path());
        for (spec, says) in [
            ("tcp://h:1=0", "1 to 64"),
            ("tcp://h:1=65", "1 to 64"),
            ("w1=x", "slot count"),
            ("w1=", "slot count"),
            ("=4", "no URL"),
            ("nope", "no podman connection"),
            ("http://h:1", "ssh://USER@HOST"),
            ("a b", "neither a URL"),
        ] {
            let e = resolve_hosts_in(&strs(&[spec]), &[], &st).expect_err(spec).to_string();
            assert!(e.contains(says), "{spec}: {e}");
        }
        let e = resolve_hosts_in(&strs(&["tcp://h:1", "tcp://h:1=2"]), &[], &st)
            .unwrap_err()
            .to_string();
        assert!(e.contains("given twice"), "{e}");
    }
}
