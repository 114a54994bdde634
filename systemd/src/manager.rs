//! The service manager (`org.freedesktop.systemd1`) over D-Bus, on the system bus or the
//! calling user's session bus: what `systemctl [--user] daemon-reload/enable/start`
//! do, in-process.
//!
//! Starting a unit is asynchronous in systemd: `StartUnit` only queues a job. To know the
//! outcome we subscribe to `JobRemoved` *before* queueing (a fast job could otherwise
//! finish before we listen), wait for our job's signal, then read the unit's state.

use std::time::Duration;

use futures_util::StreamExt as _;
use zbus::zvariant::OwnedObjectPath;
use zbus_systemd::systemd1::{ManagerProxy, ServiceProxy, UnitProxy};

/// Which manager to talk to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// PID 1, on the system bus (needs root, or polkit, for changes).
    System,
    /// The calling user's `systemd --user`, on the user's session bus.
    User,
}

#[derive(Debug, thiserror::Error)]
pub enum UnitsError {
    #[error("cannot connect to the {bus:?} bus ({address}): {source}. {hint}")]
    Connect {
        bus: Bus,
        address: String,
        hint: &'static str,
        #[source]
        source: zbus::Error,
    },
    #[error("{call} failed: {source}")]
    Call {
        call: String,
        #[source]
        source: zbus::Error,
    },
    #[error("{unit}: the {verb} job finished with result {result:?} (ActiveState={active_state}, SubState={sub_state}, Result={service_result})")]
    JobFailed {
        unit: String,
        verb: &'static str,
        result: String,
        active_state: String,
        sub_state: String,
        service_result: String,
    },
    #[error("{unit}: started, but failed right away (ActiveState={active_state}, SubState={sub_state}, Result={service_result})")]
    FailedAfterStart {
        unit: String,
        active_state: String,
        sub_state: String,
        service_result: String,
    },
    #[error("{unit}: no JobRemoved for the {verb} job within {timeout:?}")]
    Timeout {
        unit: String,
        verb: &'static str,
        timeout: Duration,
    },
}

fn call_err(call: impl Into<String>) -> impl FnOnce(zbus::Error) -> UnitsError {
    let call = call.into();
    move |source| UnitsError::Call { call, source }
}

/// A unit's state, as `systemctl show -p ActiveState,SubState,Result,LoadState`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitState {
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// The service's `Result` (`success`, `exit-code`, `watchdog`, ...); empty for
    /// units that are not services.
    pub result: String,
    /// What the service last said with `STATUS=` (services only).
    pub status_text: String,
    /// The main process's exit status (services only; 243 = credentials could not be loaded).
    pub exec_main_status: i32,
}

impl UnitState {
    pub fn is_active(&self) -> bool {
        self.active_state == "active"
    }
}

/// One change reported by `EnableUnitFiles`/`DisableUnitFiles`: (type, file, destination),
/// e.g. ("symlink", "/etc/systemd/system/multi-user.target.wants/x.service", "/etc/...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitFileChange {
    pub kind: String,
    pub file: String,
    pub destination: String,
}

/// A connection to one service manager.
#[derive(Debug, Clone)]
pub struct Systemd {
    bus: Bus,
    conn: zbus::Connection,
    manager: ManagerProxy<'static>,
}

impl Systemd {
    /// Connect to the system manager or the calling user's manager.
    pub async fn connect(bus: Bus) -> Result<Self, UnitsError> {
        let conn = connect_bus(bus).await?;
        let manager = ManagerProxy::new(&conn)
            .await
            .map_err(call_err("systemd1.Manager proxy"))?;
        Ok(Self { bus, conn, manager })
    }

    pub fn bus(&self) -> Bus {
        self.bus
    }

    /// The connection, for other services on the same bus (e.g. logind).
    pub fn connection(&self) -> &zbus::Connection {
        &self.conn
    }

    /// The manager's version string (`systemctl --version`'s number), e.g. "257.9-1~deb13u1".
    pub async fn version(&self) -> Result<String, UnitsError> {
        self.manager.version().await.map_err(call_err("Version"))
    }

    /// `daemon-reload`: re-read unit files. Blocks until the manager has reloaded.
    pub async fn reload(&self) -> Result<(), UnitsError> {
        self.manager.reload().await.map_err(call_err("Reload"))
    }

    /// `enable`: create the `[Install]` symlinks. `units` are names or absolute paths.
    pub async fn enable(&self, units: &[&str]) -> Result<Vec<UnitFileChange>, UnitsError> {
        let files = units.iter().map(|u| u.to_string()).collect();
        let (_carries_install_info, changes) = self
            .manager
            .enable_unit_files(files, false, true)
            .await
            .map_err(call_err(format!("EnableUnitFiles {units:?}")))?;
        Ok(changes.into_iter().map(change).collect())
    }

    /// `disable`: remove the `[Install]` symlinks.
    pub async fn disable(&self, units: &[&str]) -> Result<Vec<UnitFileChange>, UnitsError> {
        let files = units.iter().map(|u| u.to_string()).collect();
        let changes = self
            .manager
            .disable_unit_files(files, false)
            .await
            .map_err(call_err(format!("DisableUnitFiles {units:?}")))?;
        Ok(changes.into_iter().map(change).collect())
    }

    /// Start `unit` and wait for the job; returns the unit's state afterwards.
    pub async fn start(&self, unit: &str, timeout: Duration) -> Result<UnitState, UnitsError> {
        self.run_job(unit, Verb::Start, timeout).await
    }

    /// Restart `unit` (start it if stopped) and wait for the job.
    pub async fn restart(&self, unit: &str, timeout: Duration) -> Result<UnitState, UnitsError> {
        self.run_job(unit, Verb::Restart, timeout).await
    }

    /// Stop `unit` and wait for the job.
    pub async fn stop(&self, unit: &str, timeout: Duration) -> Result<UnitState, UnitsError> {
        self.run_job(unit, Verb::Stop, timeout).await
    }

    /// The unit's current state (loading it if needed, so unknown units report
    /// `LoadState=not-found` rather than an error).
    pub async fn unit_state(&self, unit: &str) -> Result<UnitState, UnitsError> {
        let path = self
            .manager
            .load_unit(unit.to_string())
            .await
            .map_err(call_err(format!("LoadUnit {unit}")))?;
        self.state_at(unit, path).await
    }

    async fn state_at(&self, unit: &str, path: OwnedObjectPath) -> Result<UnitState, UnitsError> {
        let u = UnitProxy::builder(&self.conn)
            .path(path.clone())
            .map_err(call_err(format!("Unit proxy {unit}")))?
            // Properties change as the job runs: never serve them from a stale cache.
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await
            .map_err(call_err(format!("Unit proxy {unit}")))?;
        let load_state = u.load_state().await.map_err(call_err(format!("{unit} LoadState")))?;
        let active_state = u
            .active_state()
            .await
            .map_err(call_err(format!("{unit} ActiveState")))?;
        let sub_state = u.sub_state().await.map_err(call_err(format!("{unit} SubState")))?;
        let result = if unit.ends_with(".service") && load_state == "loaded" {
            let s = ServiceProxy::builder(&self.conn)
                .path(path)
                .map_err(call_err(format!("Service proxy {unit}")))?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(call_err(format!("Service proxy {unit}")))?;
            (
                s.result().await.map_err(call_err(format!("{unit} Result")))?,
                s.status_text().await.map_err(call_err(format!("{unit} StatusText")))?,
                s.exec_main_status()
                    .await
                    .map_err(call_err(format!("{unit} ExecMainStatus")))?,
            )
        } else {
            (String::new(), String::new(), 0)
        };
        let (result, status_text, exec_main_status) = result;
        Ok(UnitState {
            load_state,
            active_state,
            sub_state,
            result,
            status_text,
            exec_main_status,
        })
    }

    async fn run_job(&self, unit: &str, verb: Verb, timeout: Duration) -> Result<UnitState, UnitsError> {
        // Order matters: the match rule for JobRemoved must be in place, and the manager
        // told to emit signals to us (Subscribe), before the job exists.
        let mut removed = self
            .manager
            .receive_job_removed()
            .await
            .map_err(call_err("AddMatch JobRemoved"))?;
        // One subscription per connection is enough; the second job on the same
        // connection gets AlreadySubscribed, which means exactly what we want.
        match self.manager.subscribe().await {
            Err(zbus::Error::MethodError(name, _, _))
                if name.as_str() == "org.freedesktop.systemd1.AlreadySubscribed" => {}
            r => r.map_err(call_err("Subscribe"))?,
        }

        let name = unit.to_string();
        let mode = "replace".to_string();
        let job = match verb {
            Verb::Start => self.manager.start_unit(name, mode).await,
            Verb::Restart => self.manager.restart_unit(name, mode).await,
            Verb::Stop => self.manager.stop_unit(name, mode).await,
        }
        .map_err(call_err(format!("{}Unit {unit}", verb.method())))?;

        let wait = async {
            while let Some(sig) = removed.next().await {
                let Ok(args) = sig.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(args.result.to_string());
                }
            }
            None
        };
        let result = match tokio::time::timeout(timeout, wait).await {
            Ok(Some(r)) => r,
            // The stream ended: the bus connection went away.
            Ok(None) => {
                return Err(UnitsError::Call {
                    call: format!("waiting for JobRemoved of {unit}"),
                    source: zbus::Error::InputOutput(std::sync::Arc::new(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "bus connection closed",
                    ))),
                })
            }
            Err(_) => {
                return Err(UnitsError::Timeout {
                    unit: unit.to_string(),
                    verb: verb.name(),
                    timeout,
                })
            }
        };
        let state = self.unit_state(unit).await?;
        if result != "done" {
            return Err(UnitsError::JobFailed {
                unit: unit.to_string(),
                verb: verb.name(),
                result,
                active_state: state.active_state,
                sub_state: state.sub_state,
                service_result: state.result,
            });
        }
        // A start job is "done" once the process is spawned (Type=exec/simple); a program
        // that dies at once leaves the unit failed although the job succeeded.
        if !matches!(verb, Verb::Stop) && state.active_state == "failed" {
            return Err(UnitsError::FailedAfterStart {
                unit: unit.to_string(),
                active_state: state.active_state,
                sub_state: state.sub_state,
                service_result: state.result,
            });
        }
        Ok(state)
    }
}

#[derive(Debug, Clone, Copy)]
enum Verb {
    Start,
    Restart,
    Stop,
}

impl Verb {
    fn name(self) -> &'static str {
        match self {
            Verb::Start => "start",
            Verb::Restart => "restart",
            Verb::Stop => "stop",
        }
    }
    fn method(self) -> &'static str {
        match self {
            Verb::Start => "Start",
            Verb::Restart => "Restart",
            Verb::Stop => "Stop",
        }
    }
}

fn change((kind, file, destination): (String, String, String)) -> UnitFileChange {
    UnitFileChange {
        kind,
        file,
        destination,
    }
}

/// The user's session bus address: `$DBUS_SESSION_BUS_ADDRESS`, else the standard
/// `$XDG_RUNTIME_DIR/bus` (a service or an ssh/runuser shell often has only the latter),
/// else `/run/user/$UID/bus`.
pub fn user_bus_address() -> String {
    if let Ok(a) = std::env::var("DBUS_SESSION_BUS_ADDRESS") {
        if !a.is_empty() {
            return a;
        }
    }
    let dir = std::env::var("XDG_RUNTIME_DIR")
        .ok()
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| format!("/run/user/{}", unsafe { libc::geteuid() }));
    format!("unix:path={dir}/bus")
}

pub(crate) async fn connect_bus(bus: Bus) -> Result<zbus::Connection, UnitsError> {
    match bus {
        Bus::System => zbus::Connection::system().await.map_err(|source| UnitsError::Connect {
            bus,
            address: "unix:path=/run/dbus/system_bus_socket".into(),
            hint: "Is this a systemd host with D-Bus running?",
            source,
        }),
        Bus::User => {
            let address = user_bus_address();
            let result = async { zbus::connection::Builder::address(address.as_str())?.build().await }.await;
            result.map_err(|source| UnitsError::Connect {
                bus,
                address,
                hint: "The user's manager and bus run only while the user is logged in, \
                       or always with lingering (loginctl enable-linger).",
                source,
            })
        }
    }
}
