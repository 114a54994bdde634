//! The model gateway: cohort serves the model API to its agents itself, so
//! that no agent ever holds the API key.
//!
//! One in-process HTTP server (hyper) listens on a loopback port and/or a
//! unix socket. It does three things for the agents of a run:
//! - `/v1/...` is forwarded to the real endpoint with `Authorization: Bearer
//!   <key>` put in place of the agent's per-task token (`proxy.rs`), and the
//!   answer's token usage is counted as it passes (`sse.rs`), against the
//!   task's and the run's budgets (`budget.rs`);
//! - it is the agents' HTTP proxy (`HTTPS_PROXY`), tunnelling `CONNECT` to
//!   the allow-listed hosts only (`egress.rs`);
//! - inside a container, whose network is loopback only, `cohort __bridge`
//!   carries a loopback port to the gateway's unix socket (`bridge.rs`).
//!
//! Every request must carry a token made by [`Gateway::issue`]; it names the
//! task, and dies with its [`TaskToken`].

mod bridge;
mod budget;
mod egress;
mod h1;
mod proxy;
mod server;
mod sse;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::SystemTime;

use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use bridge::bridge;
pub mod bridging {
    //! The bridge in two steps, for a caller that starts something once it listens.
    pub use super::bridge::{bind, serve};
}
pub use budget::{Budget, BudgetError, BudgetScope, BudgetSpec};
pub use egress::AllowList;

use crate::config::Price;
use crate::secret::Secret;

/// What a gateway serves, where it listens, and what it allows.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The real endpoint's base URL, e.g. `https://api.openai.com/v1`.
    pub upstream: String,
    /// The API key, added to every forwarded request and to nothing else.
    pub key: Secret,
    /// A loopback address to listen on (`127.0.0.1:0` picks a free port).
    pub tcp: Option<SocketAddr>,
    /// A unix socket to listen on (mode 0666: containers run as other users;
    /// the per-task tokens are the protection). A stale socket there is replaced.
    pub socket: Option<PathBuf>,
    /// Hosts agents may reach through the proxy (see [`AllowList`]); empty: none.
    pub allow: Vec<String>,
    pub task_budget: Option<Budget>,
    pub run_budget: Option<Budget>,
    /// Needed for budgets in dollars.
    pub price: Option<Price>,
}

impl GatewayConfig {
    /// A gateway on a free loopback port, no socket, no egress, no budgets.
    pub fn new(upstream: impl Into<String>, key: Secret) -> GatewayConfig {
        GatewayConfig {
            upstream: upstream.into(),
            key,
            tcp: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            socket: None,
            allow: Vec::new(),
            task_budget: None,
            run_budget: None,
            price: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("the gateway needs a loopback address or a unix socket to listen on")]
    NoListener,
    #[error("the gateway listens on loopback addresses only, not {0}")]
    NotLoopback(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a socket")]
    NotASocket { path: PathBuf },
    #[error("cannot connect to the gateway socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid model endpoint {url:?}: {reason}")]
    Upstream { url: String, reason: String },
    #[error("a budget in dollars needs a price per million tokens ([agent] price)")]
    NoPrice,
    #[error("invalid allow-list entry {entry:?}: {reason}")]
    Allow { entry: String, reason: &'static str },
    #[error("cannot set up the HTTP client: {0}")]
    Client(String),
    #[error("cannot start the gateway's thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Which task (and attempt) a request belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TaskKey {
    pub run_id: String,
    pub index: usize,
    pub attempt: u32,
}

impl fmt::Display for TaskKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} task {} attempt {}", self.run_id, self.index, self.attempt)
    }
}

/// Tokens counted from answers. `cached_input` is part of `input`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    /// Requests forwarded.
    pub requests: u64,
}

impl Usage {
    pub fn add(&mut self, other: &Usage) {
        self.input = self.input.saturating_add(other.input);
        self.cached_input = self.cached_input.saturating_add(other.cached_input);
        self.output = self.output.saturating_add(other.output);
        self.requests = self.requests.saturating_add(other.requests);
    }
}

/// Why the proxy refused a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The host is not on the allow-list (HTTP 403).
    NotAllowed,
    /// No `Proxy-Authorization` (HTTP 407). Clients that probe before sending
    /// credentials (libcurl, thus git) cause one of these before succeeding.
    NoToken,
    /// A token that is unknown or revoked (HTTP 407).
    BadToken,
}

/// What the run stores in its state DB and the task's log.
#[derive(Debug, Clone, PartialEq)]
pub enum GatewayEvent {
    /// One answer passed (also one cut short): what it used, and the task's total since.
    Usage { task: TaskKey, answer: Usage, total: Usage },
    /// The proxy refused a destination. `task` is `None` without a valid token.
    Refused {
        task: Option<TaskKey>,
        host: String,
        port: u16,
        at: SystemTime,
        reason: RefusalReason,
    },
    /// A request was refused because a budget is spent; sent once per task and scope.
    OverBudget {
        task: TaskKey,
        scope: BudgetScope,
        budget: Budget,
        spent: Budget,
    },
}

/// A running gateway. Stops on [`Gateway::shutdown`] or when dropped.
pub struct Gateway {
    shared: Arc<Shared>,
    addr: Option<SocketAddr>,
    socket: Option<PathBuf>,
    events: Mutex<Option<UnboundedReceiver<GatewayEvent>>>,
    /// Fires when the gateway's thread has finished its work after a stop.
    done: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
}

/// The per-task token an agent sends as `Authorization: Bearer <token>` and
/// as its proxy password. Revoked when dropped.
pub struct TaskToken {
    value: Secret,
    task: TaskKey,
    shared: Weak<Shared>,
}

impl fmt::Debug for TaskToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskToken")
            .field("task", &self.task)
            .field("token", &"***")
            .finish()
    }
}

impl TaskToken {
    pub fn task(&self) -> &TaskKey {
        &self.task
    }

    /// The token, for the agent's environment (the codex provider's `env_key`).
    pub fn expose(&self) -> &str {
        self.value.expose()
    }

    /// `http://cohort:<token>@<addr>`, for `HTTPS_PROXY`/`HTTP_PROXY`.
    pub fn proxy_url(&self, addr: SocketAddr) -> String {
        format!("http://cohort:{}@{addr}", self.value.expose())
    }

    /// The environment an agent reaching the gateway at `addr` needs for egress:
    /// the proxy variables in both cases, and `NO_PROXY` for loopback so that
    /// model requests to `http://<addr>/v1` go straight to the gateway.
    pub fn proxy_env(&self, addr: SocketAddr) -> Vec<(&'static str, String)> {
        let proxy = self.proxy_url(addr);
        let direct = "127.0.0.1,localhost,::1".to_string();
        vec![
            ("HTTPS_PROXY", proxy.clone()),
            ("HTTP_PROXY", proxy.clone()),
            ("https_proxy", proxy.clone()),
            ("http_proxy", proxy),
            ("NO_PROXY", direct.clone()),
            ("no_proxy", direct),
        ]
    }

    /// Ends the token now: later requests carrying it get 401 (407 at the proxy),
    /// and its open tunnels are closed.
    pub fn revoke(self) {}
}

impl Drop for TaskToken {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            if let Some(entry) = lock(&shared.tokens).remove(self.value.expose()) {
                entry.revoked.cancel();
            }
        }
    }
}

/// `http://<addr>/v1`: the base URL an agent reaching the gateway at `addr` uses.
pub fn base_url(addr: SocketAddr) -> String {
    format!("http://{addr}/v1")
}

impl Gateway {
    /// Binds the listeners and starts serving, on a thread of its own (see `server::start`).
    pub fn start(config: GatewayConfig) -> Result<Gateway, GatewayError> {
        if config.tcp.is_none() && config.socket.is_none() {
            return Err(GatewayError::NoListener);
        }
        if let Some(addr) = config.tcp {
            if !addr.ip().is_loopback() {
                return Err(GatewayError::NotLoopback(addr));
            }
        }
        let dollars = |b: &Option<Budget>| matches!(b, Some(Budget::Dollars(_)));
        if (dollars(&config.task_budget) || dollars(&config.run_budget)) && config.price.is_none() {
            return Err(GatewayError::NoPrice);
        }
        let allow = AllowList::parse(&config.allow)?;
        let upstream = proxy::Upstream::new(&config.upstream, config.key)?;
        let (tx, rx) = unbounded_channel();
        let shared = Arc::new(Shared {
            upstream,
            allow,
            tokens: Mutex::new(HashMap::new()),
            spend: Mutex::new(Spend::default()),
            task_budget: config.task_budget,
            run_budget: config.run_budget,
            price: config.price,
            events: tx,
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let (addr, done) = server::start(shared.clone(), config.tcp, config.socket.as_deref())?;
        tracing::debug!(?addr, socket = ?config.socket, "the model gateway is listening");
        Ok(Gateway {
            shared,
            addr,
            socket: config.socket,
            events: Mutex::new(Some(rx)),
            done: Mutex::new(Some(done)),
        })
    }

    /// The loopback address, when listening on one.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.addr
    }

    /// The unix socket, when listening on one.
    pub fn socket_path(&self) -> Option<&Path> {
        self.socket.as_deref()
    }

    /// `http://127.0.0.1:PORT/v1`, when listening on a loopback address.
    pub fn base_url(&self) -> Option<String> {
        self.addr.map(base_url)
    }

    /// A new token for `task`: 32 random bytes, hex. Several may live at once.
    pub fn issue(&self, task: TaskKey) -> TaskToken {
        let bytes: [u8; 32] = rand::random();
        let mut value = String::with_capacity(8 + 64);
        value.push_str("cohort-");
        for b in bytes {
            value.push_str(&format!("{b:02x}"));
        }
        lock(&self.shared.tokens).insert(
            value.clone(),
            TokenEntry {
                task: task.clone(),
                revoked: CancellationToken::new(),
            },
        );
        TaskToken {
            value: Secret::new(value),
            task,
            shared: Arc::downgrade(&self.shared),
        }
    }

    /// The events so far and to come; the receiver can be taken once. Events
    /// queue until it is taken, so take it when the run starts.
    pub fn take_events(&self) -> Option<UnboundedReceiver<GatewayEvent>> {
        lock(&self.events).take()
    }

    /// What `task` used so far.
    pub fn usage(&self, task: &TaskKey) -> Usage {
        lock(&self.shared.spend).tasks.get(task).copied().unwrap_or_default()
    }

    /// What all tasks of the run used so far.
    pub fn run_usage(&self) -> Usage {
        lock(&self.shared.spend).run
    }

    /// Whether `task` has spent its budget (its next request is refused).
    pub fn over_budget(&self, task: &TaskKey) -> bool {
        let spend = lock(&self.shared.spend);
        let used = spend.tasks.get(task).copied().unwrap_or_default();
        self.shared.reached(self.shared.task_budget, &used).is_some()
    }

    /// The budget that refused a request of `task`, if one did (the task's own first).
    pub fn refused_for_budget(&self, task: &TaskKey) -> Option<BudgetScope> {
        let spend = lock(&self.shared.spend);
        [BudgetScope::Task, BudgetScope::Run]
            .into_iter()
            .find(|scope| spend.reported.contains(&(task.clone(), *scope)))
    }

    /// Whether the run has spent its budget (no new task should start).
    pub fn run_over_budget(&self) -> bool {
        let spend = lock(&self.shared.spend);
        self.shared.reached(self.shared.run_budget, &spend.run).is_some()
    }

    /// Stops accepting, lets requests in flight finish for a few seconds, closes tunnels.
    pub async fn shutdown(self) {
        self.shared.stop.cancel();
        let done = lock(&self.done).take();
        if let Some(done) = done {
            // An error means the thread is gone already.
            let _ = done.await;
        }
        // Drop removes the socket file.
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.shared.stop.cancel();
        if let Some(path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// State shared by the gateway's connections.
pub(crate) struct Shared {
    upstream: proxy::Upstream,
    allow: AllowList,
    tokens: Mutex<HashMap<String, TokenEntry>>,
    spend: Mutex<Spend>,
    task_budget: Option<Budget>,
    run_budget: Option<Budget>,
    price: Option<Price>,
    events: UnboundedSender<GatewayEvent>,
    /// Cancelled on shutdown: listeners stop, connections finish, tunnels close.
    stop: CancellationToken,
    /// Every listener, connection and tunnel task, so shutdown can wait for them.
    tasks: TaskTracker,
}

struct TokenEntry {
    task: TaskKey,
    /// Cancelled on revoke: closes the token's tunnels.
    revoked: CancellationToken,
}

#[derive(Default)]
struct Spend {
    tasks: HashMap<TaskKey, Usage>,
    run: Usage,
    /// (task, scope) pairs already reported as over budget.
    reported: HashSet<(TaskKey, BudgetScope)>,
}

impl Shared {
    /// The task a token belongs to, and its revocation signal.
    fn task_for(&self, token: &str) -> Option<(TaskKey, CancellationToken)> {
        lock(&self.tokens)
            .get(token)
            .map(|e| (e.task.clone(), e.revoked.clone()))
    }

    fn emit(&self, event: GatewayEvent) {
        // No receiver (taken and dropped) means nobody is listening; that is fine.
        let _ = self.events.send(event);
    }

    /// `Some(spent)` when `budget` is reached by `used`.
    fn reached(&self, budget: Option<Budget>, used: &Usage) -> Option<(Budget, Budget)> {
        let budget = budget?;
        let spent = budget.spent(used, self.price.as_ref())?;
        budget.is_reached_by(&spent).then_some((budget, spent))
    }

    /// Before forwarding: refuse when the task's or the run's budget is spent,
    /// else count the request.
    fn admit(&self, task: &TaskKey) -> Result<(), (BudgetScope, Budget, Budget)> {
        let mut spend = lock(&self.spend);
        let used = spend.tasks.get(task).copied().unwrap_or_default();
        let over = match self.reached(self.task_budget, &used) {
            Some((b, s)) => Some((BudgetScope::Task, b, s)),
            None => self
                .reached(self.run_budget, &spend.run)
                .map(|(b, s)| (BudgetScope::Run, b, s)),
        };
        if let Some((scope, budget, spent)) = over {
            if spend.reported.insert((task.clone(), scope)) {
                self.emit(GatewayEvent::OverBudget {
                    task: task.clone(),
                    scope,
                    budget,
                    spent,
                });
            }
            return Err((scope, budget, spent));
        }
        let one = Usage {
            requests: 1,
            ..Usage::default()
        };
        spend.tasks.entry(task.clone()).or_default().add(&one);
        spend.run.add(&one);
        Ok(())
    }

    /// Adds tokens an answer reported; returns the task's new total.
    fn add_usage(&self, task: &TaskKey, usage: &Usage) -> Usage {
        let mut spend = lock(&self.spend);
        spend.run.add(usage);
        let total = spend.tasks.entry(task.clone()).or_default();
        total.add(usage);
        *total
    }

    fn task_total(&self, task: &TaskKey) -> Usage {
        lock(&self.spend).tasks.get(task).copied().unwrap_or_default()
    }
}

/// A poisoned lock only means another request panicked mid-update of
/// counters; the data is still the best there is.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
