//! podman's named connections (`podman system connection list`), read from the same files
//! podman reads, so `--host NAME` means what `podman --connection NAME` means:
//!
//! 1. `podman-connections.json` (podman 5; what `podman system connection add` writes):
//!    `$PODMAN_CONNECTIONS_CONF` when set, else `$XDG_CONFIG_HOME/containers/`, else
//!    `~/.config/containers/`. Format:
//!    `{"Connection":{"Default":"x","Connections":{"x":{"URI":"ssh://…","Identity":"/path"}}}}`.
//! 2. `[engine.service_destinations.NAME]` (`uri`, `identity`) in containers.conf
//!    (podman 4 wrote connections there; podman 5 reads them, read-only). The files, in
//!    containers-config(5) order, a later one's entry replacing an earlier one's:
//!    `/usr/share/containers/containers.conf`, then its `containers.conf.d/*.conf`
//!    (and `containers.rootful.conf.d` for root, `containers.rootless.conf.d[/UID]`
//!    otherwise), the same under `/etc/containers/`, then
//!    `$XDG_CONFIG_HOME/containers/containers.conf` (or `~/.config/…`) and its `.d`. When
//!    `$CONTAINERS_CONF` is set it is the only file; `$CONTAINERS_CONF_OVERRIDE` is read
//!    last in either case.
//!
//! A name in the JSON store wins over the same name in containers.conf (podman looks there
//! first). A missing file is empty; a file that does not parse is an error, as in podman.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::endpoint::Endpoint;
use super::error::{PodmanError, Result};

/// One named connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connection {
    pub name: String,
    pub uri: String,
    pub identity: Option<PathBuf>,
    /// The file it came from (for messages).
    pub source: PathBuf,
}

impl Connection {
    /// The endpoint, with the identity file attached for ssh.
    pub fn endpoint(&self) -> Result<Endpoint> {
        let e = Endpoint::parse(&self.uri).map_err(|e| {
            PodmanError::Endpoint(format!(
                "of connection {:?} in {}: {e}",
                self.name,
                self.source.display()
            ))
        })?;
        Ok(e.with_identity(self.identity.clone()))
    }
}

/// The files a lookup reads.
#[derive(Debug, Clone, Default)]
pub struct Store {
    pub json: Option<PathBuf>,
    /// containers.conf files, lowest precedence first.
    pub confs: Vec<PathBuf>,
}

/// `dir/*.conf`, sorted by name.
fn conf_d(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf") && p.is_file())
        .collect();
    out.sort();
    out
}

impl Store {
    /// The files podman would read for this process's environment.
    pub fn from_env() -> Store {
        let uid = nix::unistd::getuid().as_raw();
        Store::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()), uid, Path::new("/"))
    }

    /// [`Self::from_env`] with the variables from `var`, `uid`, and the system directories
    /// under `root` (tests point it at a temp dir).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>, uid: u32, root: &Path) -> Store {
        let config_home = var("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| var("HOME").map(|h| Path::new(&h).join(".config")))
            .or_else(|| super::known_hosts::home_dir().map(|h| h.join(".config")));
        let json = var("PODMAN_CONNECTIONS_CONF").map(PathBuf::from).or_else(|| {
            config_home
                .as_ref()
                .map(|c| c.join("containers/podman-connections.json"))
        });
        let mut confs = Vec::new();
        if let Some(only) = var("CONTAINERS_CONF") {
            confs.push(PathBuf::from(only));
        } else {
            for base in ["usr/share/containers", "etc/containers"] {
                let base = root.join(base);
                confs.push(base.join("containers.conf"));
                confs.extend(conf_d(&base.join("containers.conf.d")));
                if uid == 0 {
                    confs.extend(conf_d(&base.join("containers.rootful.conf.d")));
                } else {
                    confs.extend(conf_d(&base.join("containers.rootless.conf.d")));
                    confs.extend(conf_d(&base.join(format!("containers.rootless.conf.d/{uid}"))));
                }
            }
            if let Some(c) = &config_home {
                confs.push(c.join("containers/containers.conf"));
                confs.extend(conf_d(&c.join("containers/containers.conf.d")));
            }
        }
        if let Some(o) = var("CONTAINERS_CONF_OVERRIDE") {
            confs.push(PathBuf::from(o));
        }
        Store { json, confs }
    }

    /// Every named connection, the JSON store's over containers.conf's.
    pub fn all(&self) -> Result<BTreeMap<String, Connection>> {
        let mut out = BTreeMap::new();
        for path in &self.confs {
            let Some(text) = read(path)? else { continue };
            let doc: toml::Table = toml::from_str(&text).map_err(|e| bad_file(path, e))?;
            let dests = doc
                .get("engine")
                .and_then(|e| e.get("service_destinations"))
                .and_then(|d| d.as_table());
            for (name, d) in dests.into_iter().flatten() {
                let Some(uri) = d.get("uri").and_then(|u| u.as_str()) else {
                    continue;
                };
                let identity = d.get("identity").and_then(|i| i.as_str()).map(expand);
                out.insert(name.clone(), conn(name, uri, identity, path));
            }
        }
        if let Some(path) = &self.json {
            if let Some(text) = read(path)? {
                let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad_file(path, e))?;
                let conns = doc["Connection"]["Connections"].as_object();
                for (name, c) in conns.into_iter().flatten() {
                    let Some(uri) = c["URI"].as_str() else { continue };
                    let identity = c["Identity"].as_str().filter(|i| !i.is_empty()).map(expand);
                    out.insert(name.clone(), conn(name, uri, identity, path));
                }
            }
        }
        Ok(out)
    }

    /// The connection called `name`; an error listing the known names when there is none.
    pub fn lookup(&self, name: &str) -> Result<Connection> {
        let mut all = self.all()?;
        all.remove(name).ok_or_else(|| {
            let known: Vec<&str> = all.keys().map(String::as_str).collect();
            let mut files: Vec<String> = self.json.iter().map(|p| p.display().to_string()).collect();
            files.extend(
                self.confs
                    .iter()
                    .filter(|p| p.exists())
                    .map(|p| p.display().to_string()),
            );
            PodmanError::Endpoint(format!(
                "{name:?}: no podman connection of that name (known: {}; read {}). Add one with \
                 `podman system connection add {name} ssh://USER@HOST/run/user/UID/podman/podman.sock`, \
                 or give the URI itself",
                if known.is_empty() {
                    "none".to_owned()
                } else {
                    known.join(", ")
                },
                files.join(", ")
            ))
        })
    }
}

fn conn(name: &str, uri: &str, identity: Option<PathBuf>, source: &Path) -> Connection {
    Connection {
        name: name.to_owned(),
        uri: uri.to_owned(),
        identity,
        source: source.to_owned(),
    }
}

/// `~/x` → `$HOME/x`.
fn expand(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), super::known_hosts::home_dir()) {
        (Some(rest), Some(home)) => home.join(rest),
        _ => PathBuf::from(p),
    }
}

fn read(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PodmanError::Io {
            context: format!("reading podman's connections in {}", path.display()),
            source: e,
        }),
    }
}

fn bad_file(path: &Path, e: impl std::fmt::Display) -> PodmanError {
    PodmanError::Endpoint(format!(
        "connections: {} does not parse ({e}); podman itself would refuse it too",
        path.display()
    ))
}

/// `NAME` looked up in podman's connections ([`Store::from_env`]).
pub fn resolve(name: &str) -> Result<Endpoint> {
    Store::from_env().lookup(name)?.endpoint()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(p: &Path, text: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    const JSON: &str = r#"{"Connection":{"Default":"w1","Connections":{
        "w1":{"URI":"ssh://core@10.0.0.5:2222/run/user/1000/podman/podman.sock","Identity":"/keys/w1","IsMachine":false},
        "both":{"URI":"tcp://10.0.0.9:8888","Identity":""}}},"Farm":{}}"#;

    #[test]
    fn json_store_and_containers_conf_in_podmans_order() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        let xdg = d.path().join("xdg");
        write(&xdg.join("containers/podman-connections.json"), JSON);
        write(
            &root.join("usr/share/containers/containers.conf"),
            "[engine.service_destinations.old]\nuri = \"tcp://10.0.0.1:1\"\n\
             [engine.service_destinations.both]\nuri = \"tcp://10.0.0.1:2\"\n",
        );
        write(
            &root.join("etc/containers/containers.conf"),
            "[containers]\nlog_size_max = -1\n[engine]\ncgroup_manager = \"cgroupfs\"\n\
             [engine.service_destinations.old]\nuri = \"ssh://root@10.0.0.3/run/podman/podman.sock\"\nidentity = \"/keys/old\"\n",
        );
        write(
            &root.join("etc/containers/containers.rootless.conf.d/1000/z.conf"),
            "[engine.service_destinations.mine]\nuri = \"unix:///run/user/1000/podman/podman.sock\"\n",
        );
        write(&root.join("etc/containers/containers.conf.d/ignored.txt"), "not toml [");
        let env = |k: &str| (k == "XDG_CONFIG_HOME").then(|| xdg.display().to_string());
        let store = Store::from_vars(env, 1000, &root);
        let all = store.all().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["both", "mine", "old", "w1"]);
        // /etc overrides /usr/share; the identity comes along to the ssh endpoint.
        let Endpoint::Ssh(t) = all["old"].endpoint().unwrap() else {
            panic!()
        };
        assert_eq!(
            (t.host.as_str(), t.identity.as_deref()),
            ("10.0.0.3", Some(Path::new("/keys/old")))
        );
        // The JSON store wins a name both have.
        assert_eq!(all["both"].endpoint().unwrap().to_string(), "tcp://10.0.0.9:8888");
        let Endpoint::Ssh(t) = store.lookup("w1").unwrap().endpoint().unwrap() else {
            panic!()
        };
        assert_eq!((t.user.as_str(), t.port), ("core", 2222));
        assert_eq!(t.identity.as_deref(), Some(Path::new("/keys/w1")));
        // Root does not read the rootless drop-ins.
        assert!(!Store::from_vars(env, 0, &root).all().unwrap().contains_key("mine"));
        let e = store.lookup("nope").unwrap_err().to_string();
        assert!(
            e.contains("known: both, mine, old, w1") && e.contains("podman system connection add nope"),
            "{e}"
        );

        // CONTAINERS_CONF alone replaces every containers.conf; PODMAN_CONNECTIONS_CONF moves the JSON.
        let only = d.path().join("only.conf");
        write(
            &only,
            "[engine.service_destinations.solo]\nuri = \"tcp://127.0.0.1:9\"\n",
        );
        let env2 = |k: &str| match k {
            "CONTAINERS_CONF" => Some(only.display().to_string()),
            "PODMAN_CONNECTIONS_CONF" => Some(d.path().join("none.json").display().to_string()),
            "XDG_CONFIG_HOME" => Some(xdg.display().to_string()),
            _ => None,
        };
        let all = Store::from_vars(env2, 1000, &root).all().unwrap();
        assert_eq!(all.keys().collect::<Vec<_>>(), ["solo"]);

        write(&only, "[engine\n");
        let e = Store::from_vars(env2, 1000, &root).all().unwrap_err().to_string();
        assert!(e.contains("only.conf"), "{e}");
    }
}
