//! Request and response shapes of the libpod v4 API (only the fields cohort uses).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The service's podman version and libpod API version (from `_ping` and `/info`).
#[derive(Debug, Clone, Default)]
pub struct VersionInfo {
    pub version: String,
    /// The libpod API version, not the Docker-compatible one `/version` gives.
    pub api_version: String,
}

/// Container network mode (`[container] network`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    /// The engine's default private network (bridge when rootful, slirp4netns when rootless).
    #[default]
    Private,
    /// No network at all: only loopback.
    None,
    /// Share the host's network namespace.
    Host,
}

/// User-namespace mode. `for_engine` picks cohort's default: `keep-id` rootless (the
/// container user is the invoking user, so checkout files stay theirs), `auto` rootful
/// (each container gets its own unprivileged range).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsernsMode {
    /// The invoking host user appears in the container as `uid:gid` (podman >= 4.3's
    /// `keep-id:uid=,gid=`), or as itself when `None`. Mapping it onto the image's user matters:
    /// the image's `User` wins over plain keep-id, and would then own nothing in the checkout.
    KeepId(Option<(u32, u32)>),
    Auto,
    /// `auto` with one pinned mapping: container `uid:gid` (the image user) is host
    /// `owner` (the checkout's owner), everything else an unprivileged auto range. For a
    /// rootful engine when cohort cannot make idmapped views (the hardened system service):
    /// the agent still gets its own user namespace, and what it writes belongs to the owner.
    AutoPinned {
        user: (u32, u32),
        owner: (u32, u32),
    },
    Host,
}

impl UsernsMode {
    /// `image_user` is the image's numeric user (cohort-oci's `ImageSettings` uid/gid).
    pub fn for_engine(rootless: bool, image_user: Option<(u32, u32)>) -> Self {
        if rootless {
            UsernsMode::KeepId(image_user)
        } else {
            UsernsMode::Auto
        }
    }
}

/// A bind mount from the host into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub source: String,
    pub destination: String,
    pub read_only: bool,
    /// Extra podman mount options (e.g. `U` to chown to the container user, `z` for SELinux).
    pub options: Vec<String>,
}

impl BindMount {
    pub fn new(source: impl Into<String>, destination: impl Into<String>) -> Self {
        BindMount {
            source: source.into(),
            destination: destination.into(),
            read_only: false,
            options: Vec::new(),
        }
    }
}

/// A named volume mounted into the container (a persistent cache).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    pub name: String,
    pub destination: String,
    /// podman's volume options (e.g. `U`: hand it to the container's user at each start).
    pub options: Vec<String>,
}

/// What cohort asks of a new container. Never put secrets here: the create spec is stored
/// by podman and shown by `podman inspect`. Secrets go per exec in [`ExecSpec::env`], or
/// down the attached stdin of the main process (see the runtime's task containers).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContainerSpec {
    pub name: Option<String>,
    pub image: String,
    /// Host directory mounted at `/workspace`.
    pub workspace: Option<String>,
    pub mounts: Vec<BindMount>,
    pub volumes: Vec<VolumeMount>,
    /// `None`: decided by the engine being rootless or not (see [`UsernsMode::for_engine`]).
    pub userns: Option<UsernsMode>,
    /// The image's numeric `uid:gid`; rootless keep-id maps the host user onto it.
    pub image_user: Option<(u32, u32)>,
    pub network: NetworkMode,
    pub memory_bytes: Option<i64>,
    pub pids_limit: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// Main process; default keeps the container alive (`sleep infinity`) so execs can run in it.
    pub command: Option<Vec<String>>,
    /// `KEY=VALUE` for the main process, on top of the image's; never a secret.
    pub env: Vec<String>,
    /// Podman secrets given as files: how a secret reaches a container without being in its
    /// create spec or `inspect`. (Not podman's `type=env` secrets: podman 4.3's `inspect`
    /// shows their values in `Config.Env` once the container has started.)
    pub secret_files: Vec<SecretFile>,
    /// Leave the image's declared volumes (its WORKDIR) as plain directories of the
    /// container's own filesystem, instead of anonymous volumes.
    pub ignore_image_volumes: bool,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub terminal: bool,
    pub stdin: bool,
    pub hostname: Option<String>,
    /// No container log (log driver `none`): whoever attached already has the output, and a
    /// task agent's output would otherwise be kept twice (in the journal with journald).
    pub no_log: bool,
    /// Podman deletes the container once its main process has exited, whoever ended it
    /// (podman's `--rm`). The logs go with it.
    pub auto_remove: bool,
}

#[derive(Serialize)]
pub(crate) struct Namespace {
    pub nsmode: &'static str,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub value: String,
}

#[derive(Serialize)]
pub(crate) struct SpecMount {
    pub destination: String,
    #[serde(rename = "type")]
    pub typ: &'static str,
    pub source: String,
    pub options: Vec<String>,
}

/// A podman secret as a file in the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretFile {
    /// The podman secret's name.
    pub secret: String,
    /// Absolute path in the container.
    pub path: String,
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// specgen's `Secret` (Go field names, no JSON tags upstream).
#[derive(Serialize)]
pub(crate) struct SpecSecret {
    #[serde(rename = "Source")]
    pub source: String,
    #[serde(rename = "Target")]
    pub target: String,
    #[serde(rename = "UID")]
    pub uid: u32,
    #[serde(rename = "GID")]
    pub gid: u32,
    #[serde(rename = "Mode")]
    pub mode: u32,
}

/// specgen's `NamedVolume` (Go field names, no JSON tags upstream).
#[derive(Serialize)]
pub(crate) struct SpecVolume {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Dest")]
    pub dest: String,
    #[serde(rename = "Options")]
    pub options: Vec<String>,
}

#[derive(Serialize, Default)]
pub(crate) struct Limit {
    pub limit: i64,
}

#[derive(Serialize, Default)]
pub(crate) struct ResourceLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<Limit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pids: Option<Limit>,
}

/// `containers/storage`'s `IDMappingOptions` (Go field names, no JSON tags upstream).
#[derive(Serialize)]
pub(crate) struct IdMappings {
    /// Podman 4.3's REST API does not derive this from `userns: {nsmode: "auto"}` (the CLI
    /// does, client-side): without it the container silently gets no user namespace at all.
    #[serde(rename = "AutoUserNs")]
    pub auto_user_ns: bool,
    /// Likewise the CLI's `auto:uidmapping=...` options: the server reads only these.
    #[serde(rename = "AutoUserNsOpts", skip_serializing_if = "Option::is_none")]
    pub auto_opts: Option<AutoUserNsOpts>,
}

/// `containers/storage`'s `AutoUserNsOptions` (subset).
#[derive(Serialize)]
pub(crate) struct AutoUserNsOpts {
    #[serde(rename = "AdditionalUIDMappings")]
    pub uids: Vec<IdRange>,
    #[serde(rename = "AdditionalGIDMappings")]
    pub gids: Vec<IdRange>,
}

/// `idtools.IDMap`.
#[derive(Serialize)]
pub(crate) struct IdRange {
    pub container_id: u32,
    pub host_id: u32,
    pub size: u32,
}

/// The libpod `SpecGenerator` JSON (subset).
#[derive(Serialize)]
pub(crate) struct CreateBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub image: String,
    pub command: Vec<String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SpecSecret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_volume_mode: Option<&'static str>,
    pub labels: BTreeMap<String, String>,
    pub mounts: Vec<SpecMount>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<SpecVolume>,
    pub userns: Namespace,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idmappings: Option<IdMappings>,
    pub netns: Namespace,
    pub resource_limits: ResourceLimits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    pub terminal: bool,
    pub stdin: bool,
    pub no_new_privileges: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_configuration: Option<LogConfig>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub remove: bool,
}

#[derive(Serialize)]
pub(crate) struct LogConfig {
    pub driver: &'static str,
}

impl ContainerSpec {
    pub(crate) fn to_body(&self, rootless: bool) -> CreateBody {
        let mut mounts = Vec::new();
        let ws = self.workspace.iter().map(|w| BindMount::new(w.clone(), "/workspace"));
        for m in ws.chain(self.mounts.iter().cloned()) {
            let mut options = vec!["rbind".to_string(), if m.read_only { "ro" } else { "rw" }.to_string()];
            options.extend(m.options.iter().cloned());
            mounts.push(SpecMount {
                destination: m.destination,
                typ: "bind",
                source: m.source,
                options,
            });
        }
        let ns = |nsmode, value: String| Namespace { nsmode, value };
        let mode = self
            .userns
            .clone()
            .unwrap_or_else(|| UsernsMode::for_engine(rootless, self.image_user));
        let one = |container_id, host_id| {
            vec![IdRange {
                container_id,
                host_id,
                size: 1,
            }]
        };
        let idmappings = match mode {
            UsernsMode::Auto => Some(IdMappings {
                auto_user_ns: true,
                auto_opts: None,
            }),
            UsernsMode::AutoPinned { user, owner } => Some(IdMappings {
                auto_user_ns: true,
                auto_opts: Some(AutoUserNsOpts {
                    uids: one(user.0, owner.0),
                    gids: one(user.1, owner.1),
                }),
            }),
            _ => None,
        };
        if mode != UsernsMode::Host && self.network == NetworkMode::Host {
            // sysfs can only be mounted by the owner of the network namespace; in a new user
            // namespace sharing the host's, runc fails with EPERM (crun quietly does this).
            mounts.push(SpecMount {
                destination: "/sys".into(),
                typ: "bind",
                source: "/sys".into(),
                options: vec!["rbind".into(), "ro".into()],
            });
        }
        let userns = match mode {
            UsernsMode::KeepId(Some((uid, gid))) => ns("keep-id", format!("uid={uid},gid={gid}")),
            UsernsMode::KeepId(None) => ns("keep-id", String::new()),
            UsernsMode::Auto => ns("auto", String::new()),
            UsernsMode::AutoPinned { user, owner } => ns(
                "auto",
                format!(
                    "uidmapping={}:{}:1,gidmapping={}:{}:1",
                    user.0, owner.0, user.1, owner.1
                ),
            ),
            UsernsMode::Host => ns("host", String::new()),
        };
        let netns = match self.network {
            NetworkMode::Private => "private",
            NetworkMode::None => "none",
            NetworkMode::Host => "host",
        };
        CreateBody {
            name: self.name.clone(),
            image: self.image.clone(),
            command: self
                .command
                .clone()
                .unwrap_or_else(|| vec!["sleep".into(), "infinity".into()]),
            env: self
                .env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (kv.clone(), String::new()),
                })
                .collect(),
            secrets: self
                .secret_files
                .iter()
                .map(|f| SpecSecret {
                    source: f.secret.clone(),
                    target: f.path.clone(),
                    uid: f.uid,
                    gid: f.gid,
                    mode: f.mode,
                })
                .collect(),
            image_volume_mode: self.ignore_image_volumes.then_some("ignore"),
            labels: self.labels.clone(),
            mounts,
            volumes: self
                .volumes
                .iter()
                .map(|v| SpecVolume {
                    name: v.name.clone(),
                    dest: v.destination.clone(),
                    options: v.options.clone(),
                })
                .collect(),
            userns,
            idmappings,
            netns: Namespace {
                nsmode: netns,
                value: String::new(),
            },
            resource_limits: ResourceLimits {
                memory: self.memory_bytes.map(|limit| Limit { limit }),
                pids: self.pids_limit.map(|limit| Limit { limit }),
            },
            work_dir: self.workdir.clone(),
            user: self.user.clone(),
            hostname: self.hostname.clone(),
            terminal: self.terminal,
            stdin: self.stdin,
            no_new_privileges: true,
            log_configuration: self.no_log.then_some(LogConfig { driver: "none" }),
            remove: self.auto_remove,
        }
    }
}

/// One command run inside a running container.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub cmd: Vec<String>,
    /// `KEY=VALUE`; the only way a secret (the API key) reaches the agent.
    pub env: Vec<String>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    pub tty: bool,
    pub stdin: bool,
}

impl ExecSpec {
    pub fn new<S: Into<String>>(cmd: impl IntoIterator<Item = S>) -> Self {
        ExecSpec {
            cmd: cmd.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }
}

/// Env values are never printed: they may hold the API key.
impl fmt::Debug for ExecSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<&str> = self.env.iter().map(|e| e.split('=').next().unwrap_or("")).collect();
        f.debug_struct("ExecSpec")
            .field("cmd", &self.cmd)
            .field("env_keys", &keys)
            .field("workdir", &self.workdir)
            .field("user", &self.user)
            .field("tty", &self.tty)
            .field("stdin", &self.stdin)
            .finish()
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub(crate) struct ExecCreateBody<'a> {
    pub attach_stdin: bool,
    pub attach_stdout: bool,
    pub attach_stderr: bool,
    pub cmd: &'a [String],
    pub env: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    pub tty: bool,
}

/// What a finished exec produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_str(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExecInspect {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "Running", default)]
    pub running: bool,
    #[serde(rename = "ExitCode", default)]
    pub exit_code: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerState {
    #[serde(rename = "Status", default)]
    pub status: String,
    #[serde(rename = "Running", default)]
    pub running: bool,
    #[serde(rename = "ExitCode", default)]
    pub exit_code: i64,
    #[serde(rename = "OOMKilled", default)]
    pub oom_killed: bool,
    #[serde(rename = "Error", default)]
    pub error: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerConfigInfo {
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
}

/// `GET /libpod/containers/{id}/json` (subset).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerInspect {
    #[serde(rename = "Id", default)]
    pub id: String,
    #[serde(rename = "Name", default)]
    pub name: String,
    #[serde(rename = "ImageName", default)]
    pub image_name: String,
    #[serde(rename = "State", default)]
    pub state: ContainerState,
    #[serde(rename = "Config", default)]
    pub config: ContainerConfigInfo,
}

/// One row of `GET /libpod/containers/json`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerSummary {
    #[serde(rename = "Id", default)]
    pub id: String,
    #[serde(rename = "Names", default)]
    pub names: Vec<String>,
    #[serde(rename = "Image", default)]
    pub image: String,
    #[serde(rename = "State", default)]
    pub state: String,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "ExitCode", default)]
    pub exit_code: i64,
}

/// `GET /libpod/images/{name}/json` (subset).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ImageInspect {
    #[serde(rename = "Id", default)]
    pub id: String,
    #[serde(rename = "Digest", default)]
    pub digest: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(rename = "Labels", default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "Size", default)]
    pub size: i64,
}
