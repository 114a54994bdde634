//! `cohort container run [--name N] [--mount DIR] [--service]` and `cohort container enter [--name N]`:
//! a development container from the cohort image, with an interactive shell over podman's
//! REST socket (a real TTY when the local terminal is one: raw mode, window resize, exit code).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cli::usage;
use crate::config::Config;
use crate::git::RepoPaths;
use crate::runtime::podman::{
    BindMount, ContainerSpec, ExecSpec, NetworkMode, Podman, PodmanSettings, StreamKind, UsernsMode, DEFAULT_IMAGE,
};

/// The container name when `--name` is not given.
pub const DEFAULT_NAME: &str = "cohort-dev";

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub command: ContainerCommand,
}

#[derive(clap::Subcommand, Debug)]
pub enum ContainerCommand {
    /// Create a container from the image, run the [container] startup commands, open a shell in it.
    Run(RunArgs),
    /// Open a shell in an existing container (started first if it is stopped).
    Enter(EnterArgs),
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// The container's name.
    #[arg(long, value_name = "N", default_value = DEFAULT_NAME)]
    pub name: String,
    /// The directory mounted at /workspace (default: the current directory).
    #[arg(long, value_name = "DIR", conflicts_with = "service")]
    pub mount: Option<PathBuf>,
    /// Use the service's mount points: the repository at /workspace, its git dir at its own
    /// path, and [container] mounts.
    #[arg(long)]
    pub service: bool,
}

#[derive(clap::Args, Debug)]
pub struct EnterArgs {
    /// The container's name.
    #[arg(long, value_name = "N", default_value = DEFAULT_NAME)]
    pub name: String,
}

/// Task-container settings from `[image]` and `[container]`.
pub fn podman_settings(config: &Config) -> Result<PodmanSettings> {
    Ok(PodmanSettings {
        image: config.image.tag.clone().unwrap_or_else(|| DEFAULT_IMAGE.into()),
        // No network by default: agents reach the model and the allow-listed hosts through
        // cohort's gateway only.
        network: config.container.network.unwrap_or(NetworkMode::None),
        memory_bytes: config.container.memory_bytes()?,
        pids_limit: config.container.pids,
        mounts: config_mounts(config)?,
    })
}

fn config_mounts(config: &Config) -> Result<Vec<BindMount>> {
    Ok(config
        .container
        .bind_mounts()?
        .into_iter()
        .map(|(src, dst, ro)| BindMount {
            read_only: ro,
            ..BindMount::new(src, dst)
        })
        .collect())
}

pub async fn run(args: Args, config_path: Option<&Path>) -> Result<u8> {
    match args.command {
        ContainerCommand::Run(a) => run_container(a, config_path).await,
        ContainerCommand::Enter(a) => enter(a).await,
    }
}

async fn run_container(args: RunArgs, config_path: Option<&Path>) -> Result<u8> {
    let cwd = std::env::current_dir()?;
    let paths = RepoPaths::discover(&cwd).ok();
    let config = Config::load(config_path, paths.as_ref().map(|p| p.workdir.as_path()))?;
    let podman = Podman::connect().await?;
    let image = config.image.tag.clone().unwrap_or_else(|| DEFAULT_IMAGE.into());
    if !podman.image_exists(&image).await? {
        return Err(usage(format!(
            "image {image} is not in podman's storage; build it with `cohort image build`"
        )));
    }
    if podman.container_exists(&args.name).await? {
        return Err(usage(format!(
            "a container named {} exists already; `cohort container enter --name {}` opens a shell in it",
            args.name, args.name
        )));
    }
    let mut mounts = Vec::new();
    let workspace = if args.service {
        let paths = paths.ok_or_else(|| usage("--service needs a git repository (cd into it or use -C REPO)"))?;
        mounts.push(BindMount::new(
            paths.common_dir.display().to_string(),
            paths.common_dir.display().to_string(),
        ));
        mounts.extend(config_mounts(&config)?);
        paths.workdir.clone()
    } else {
        let dir = args.mount.clone().unwrap_or(cwd);
        std::fs::canonicalize(&dir).with_context(|| format!("--mount {}", dir.display()))?
    };
    let (userns, user) = if podman.rootless() {
        (None, None)
    } else {
        // The host owner of the workspace, no user namespace. Unlike task containers (userns=auto
        // with idmapped views that live as long as the cohort that made them), a dev container
        // is stopped and re-entered across cohort invocations, so it keeps plain bind mounts.
        let meta = std::fs::metadata(&workspace).with_context(|| format!("cannot read {}", workspace.display()))?;
        (Some(UsernsMode::Host), Some(format!("{}:{}", meta.uid(), meta.gid())))
    };
    let raw: serde_json::Value = podman.image_inspect_raw(&image).await?;
    let image_user = raw["Config"]["User"].as_str().and_then(|u| {
        let mut it = u.splitn(2, ':');
        let uid: u32 = it.next()?.parse().ok()?;
        Some((uid, it.next().and_then(|g| g.parse().ok()).unwrap_or(uid)))
    });
    let mut labels = std::collections::BTreeMap::new();
    labels.insert("cohort".to_string(), "dev".to_string());
    let spec = ContainerSpec {
        name: Some(args.name.clone()),
        image: image.clone(),
        workspace: Some(workspace.display().to_string()),
        mounts,
        userns,
        image_user,
        // A development shell is yours, not an agent's: it keeps a network of its own.
        network: config.container.network.unwrap_or(NetworkMode::Private),
        memory_bytes: config.container.memory_bytes()?,
        pids_limit: config.container.pids,
        labels,
        workdir: Some(crate::runtime::podman::WORKSPACE.into()),
        user,
        hostname: Some(args.name.clone()),
        ..Default::default()
    };
    let id = podman.create_container(&spec).await?;
    podman.start_container(&id).await?;
    eprintln!(
        "cohort: container {} from {image}, {} at /workspace",
        args.name,
        workspace.display()
    );
    for cmd in config.container.startup.iter().flatten() {
        eprintln!("cohort: startup: {cmd}");
        let out = podman.exec(&id, &ExecSpec::new(["sh", "-c", cmd.as_str()])).await?;
        std::io::Write::write_all(&mut std::io::stdout(), &out.stdout)?;
        std::io::Write::write_all(&mut std::io::stderr(), &out.stderr)?;
        if out.exit_code != 0 {
            return Err(anyhow::anyhow!(
                "startup command {cmd:?} exited with {}; the container {} is left running \
                 (`cohort container enter --name {}`)",
                out.exit_code,
                args.name,
                args.name
            ));
        }
    }
    shell(&podman, &id).await
}

async fn enter(args: EnterArgs) -> Result<u8> {
    let podman = Podman::connect().await?;
    let info = match podman.inspect_container(&args.name).await {
        Ok(i) => i,
        Err(e) if e.is_not_found() => {
            return Err(usage(format!(
                "no container named {}; create one with `cohort container run --name {}`",
                args.name, args.name
            )))
        }
        Err(e) => return Err(e.into()),
    };
    if !info.state.running {
        eprintln!("cohort: starting container {} ({})", args.name, info.state.status);
        podman.start_container(&info.id).await?;
    }
    shell(&podman, &info.id).await
}

/// The shell: bash when the image has it, else sh.
const SHELL: &[&str] = &[
    "sh",
    "-c",
    "if command -v bash >/dev/null 2>&1; then exec bash; else exec sh; fi",
];

/// An interactive shell in the container. With a terminal on stdin: a TTY exec, the local
/// terminal in raw mode, SIGWINCH forwarded as exec resize. Otherwise stdin is piped through
/// and stdout/stderr kept apart. The shell's exit code is returned.
pub async fn shell(podman: &Podman, id: &str) -> Result<u8> {
    let tty = unsafe { libc::isatty(0) == 1 };
    let mut spec = ExecSpec::new(SHELL.iter().copied());
    spec.stdin = true;
    spec.tty = tty;
    if tty {
        spec.env.push(format!(
            "TERM={}",
            std::env::var("TERM").unwrap_or_else(|_| "xterm".into())
        ));
    }
    let exec_id = podman.exec_create(id, &spec).await?;
    let session = podman.exec_start(&exec_id, tty).await?;
    // stdin from a plain thread: a blocking read in tokio's pool would hold up exit.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 4096];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let raw = if tty { RawMode::enter().ok() } else { None };
    let code = if tty {
        // The first size before any input reaches the shell, so its first command sees it.
        if let Some((rows, cols)) = window_size() {
            let _ = podman.exec_resize(&exec_id, rows, cols).await;
        }
        let resize = {
            let podman = podman.clone();
            let exec_id = exec_id.clone();
            tokio::spawn(async move {
                let Ok(mut winch) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                else {
                    return;
                };
                while winch.recv().await.is_some() {
                    if let Some((rows, cols)) = window_size() {
                        let _ = podman.exec_resize(&exec_id, rows, cols).await;
                    }
                }
            })
        };
        let (mut reader, mut writer) = tokio::io::split(session.into_io());
        let feed = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                if writer.write_all(&data).await.is_err() || writer.flush().await.is_err() {
                    break;
                }
            }
            let _ = writer.shutdown().await;
        });
        let mut out = tokio::io::stdout();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = reader.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).await?;
            out.flush().await?;
        }
        resize.abort();
        feed.abort();
        podman.exec_exit_code(&exec_id).await?
    } else {
        let mut session = session;
        let mut stdin_open = true;
        let mut out = tokio::io::stdout();
        let mut err = tokio::io::stderr();
        loop {
            tokio::select! {
                data = rx.recv(), if stdin_open => match data {
                    Some(d) => session.write_stdin(&d).await?,
                    None => {
                        stdin_open = false;
                        session.close_stdin().await?;
                    }
                },
                frame = session.next_frame() => match frame? {
                    None => break,
                    Some(f) => match f.stream {
                        StreamKind::Stderr | StreamKind::System => err.write_all(&f.data).await?,
                        _ => out.write_all(&f.data).await?,
                    },
                },
            }
        }
        out.flush().await?;
        podman.exec_exit_code(&exec_id).await?
    };
    drop(raw);
    Ok((code & 0xff) as u8)
}

fn window_size() -> Option<(u16, u16)> {
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let ok = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) } == 0;
    (ok && ws.ws_row > 0).then_some((ws.ws_row, ws.ws_col))
}

/// The local terminal in raw mode until dropped.
struct RawMode(libc::termios);

impl RawMode {
    fn enter() -> std::io::Result<RawMode> {
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            if libc::tcsetattr(0, libc::TCSANOW, &t) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(RawMode(saved))
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        unsafe {
            libc::tcsetattr(0, libc::TCSANOW, &self.0);
        }
    }
}
