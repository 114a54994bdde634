//! The controller's table of jobs: waiting for a worker, or leased to one. A lease is a
//! random id only the worker that took it knows; it ends with the result, with the job's
//! cancellation, or when the worker goes silent, and then the job waits again. A lease that
//! ended is unknown: what a worker sends for it is refused, so nothing runs to completion
//! twice.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use super::protocol::{Job, JobResult};
use crate::git::Oid;
use crate::runtime::Output;

/// A job as the controller holds it, before it is fitted to a worker's checkout.
pub struct Work {
    /// Everything but `lease` and `changes`, with the controller's paths.
    pub job: Job,
    pub tree: Oid,
    /// The controller's checkout and scratch paths, which the job's command line names.
    pub workdir: String,
    pub scratch: Option<String>,
    pub output: UnboundedSender<Output>,
    pub done: Option<oneshot::Sender<Finished>>,
}

/// A job's end, as its waiter learns it.
pub enum Finished {
    Done {
        worker: String,
        result: Box<JobResult>,
        bytes_sent: usize,
        bytes_received: usize,
    },
    Failed(String),
}

struct Leased {
    job: u64,
    worker: String,
    seen: Instant,
    bytes_sent: usize,
}

#[derive(Default)]
pub struct Queue {
    next: u64,
    waiting: VecDeque<u64>,
    work: HashMap<u64, Work>,
    leases: HashMap<String, Leased>,
}

/// A job taken off the queue for a worker, not yet leased (its changes are being made).
pub struct Taken {
    pub id: u64,
    pub job: Job,
    pub tree: Oid,
    pub workdir: String,
    pub scratch: Option<String>,
}

impl Queue {
    pub fn push(&mut self, work: Work) -> u64 {
        self.next += 1;
        self.work.insert(self.next, work);
        self.waiting.push_back(self.next);
        self.next
    }

    /// Drops a job wherever it is (its waiter gave up): a worker running it learns at its
    /// next heartbeat that its lease is gone.
    pub fn cancel(&mut self, id: u64) {
        self.work.remove(&id);
        self.waiting.retain(|j| *j != id);
        self.leases.retain(|_, l| l.job != id);
    }

    /// The next waiting job, if any.
    pub fn take(&mut self) -> Option<Taken> {
        while let Some(id) = self.waiting.pop_front() {
            if let Some(w) = self.work.get(&id) {
                return Some(Taken {
                    id,
                    job: w.job.clone(),
                    tree: w.tree,
                    workdir: w.workdir.clone(),
                    scratch: w.scratch.clone(),
                });
            }
        }
        None
    }

    /// Puts a taken job back at the front (its changes could not be made for this worker).
    pub fn untake(&mut self, id: u64) {
        if self.work.contains_key(&id) {
            self.waiting.push_front(id);
        }
    }

    /// Leases a taken job to `worker`; None if it was cancelled meanwhile.
    pub fn lease(&mut self, id: u64, worker: &str, bytes_sent: usize) -> Option<String> {
        let work = self.work.get(&id)?;
        let mut raw = [0u8; 16];
        rand::rng().fill_bytes(&mut raw);
        let lease: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let _ = work.output.send(Output::Placed(worker.to_string()));
        self.leases.insert(
            lease.clone(),
            Leased {
                job: id,
                worker: worker.to_string(),
                seen: Instant::now(),
                bytes_sent,
            },
        );
        Some(lease)
    }

    /// Records the size of the job as sent, for the bytes-per-task figure.
    pub fn sent(&mut self, lease: &str, bytes: usize) {
        if let Some(l) = self.leases.get_mut(lease) {
            l.bytes_sent = bytes;
        }
    }

    /// A sign of life on `lease`; the job's output channel if the lease is still held.
    pub fn touch(&mut self, lease: &str) -> Option<UnboundedSender<Output>> {
        let l = self.leases.get_mut(lease)?;
        l.seen = Instant::now();
        self.work.get(&l.job).map(|w| w.output.clone())
    }

    /// Ends `lease` with its result; false if it is not held (ended, lost, or never given).
    pub fn finish(&mut self, lease: &str, result: JobResult, bytes_received: usize) -> bool {
        let Some(l) = self.leases.remove(lease) else {
            return false;
        };
        let Some(mut work) = self.work.remove(&l.job) else {
            return false;
        };
        if let Some(done) = work.done.take() {
            let _ = done.send(Finished::Done {
                worker: l.worker,
                result: Box::new(result),
                bytes_sent: l.bytes_sent,
                bytes_received,
            });
        }
        true
    }

    /// Fails a job outright (it cannot be fitted to any worker).
    pub fn fail(&mut self, id: u64, why: String) {
        if let Some(mut work) = self.work.remove(&id) {
            if let Some(done) = work.done.take() {
                let _ = done.send(Finished::Failed(why));
            }
        }
    }

    /// Ends the leases of workers silent for longer than `timeout`; their jobs wait again,
    /// first in line. Returns (worker, task) of each.
    pub fn expire(&mut self, timeout: Duration) -> Vec<(String, usize)> {
        let now = Instant::now();
        let lost: Vec<String> = self
            .leases
            .iter()
            .filter(|(_, l)| now.duration_since(l.seen) > timeout)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in lost {
            let Some(l) = self.leases.remove(&key) else { continue };
            if let Some(w) = self.work.get(&l.job) {
                let _ = w.output.send(Output::Stderr(format!(
                    "cohort: worker {} went silent for over {}s; the task goes back to the queue",
                    l.worker,
                    timeout.as_secs()
                )));
                out.push((l.worker, w.job.task));
                self.waiting.push_front(l.job);
            }
        }
        out
    }

    pub fn is_idle(&self) -> bool {
        self.work.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::protocol::WireExit;

    fn job() -> Job {
        serde_json::from_value(serde_json::json!({
            "lease": "", "run_id": "r", "task": 1, "role": "agent", "tree": "", "changes": [],
            "scratch": [], "program": "true", "args": [], "env": [], "secret_env": [], "stdin": null,
            "timeout_secs": null, "caches": [], "gateway": null, "heartbeat_secs": 1, "reset": false
        }))
        .unwrap()
    }

    fn result() -> JobResult {
        JobResult {
            exit: WireExit::Code(0),
            changes: vec![],
            scratch: vec![],
        }
    }

    #[test]
    fn a_lost_lease_requeues_and_its_late_result_is_refused() {
        let mut q = Queue::default();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (done, mut finished) = oneshot::channel();
        let id = q.push(Work {
            job: job(),
            tree: Oid::null(gix::hash::Kind::Sha1),
            workdir: "/w".into(),
            scratch: None,
            output: tx,
            done: Some(done),
        });
        let t = q.take().unwrap();
        let first = q.lease(t.id, "a/1", 10).unwrap();
        assert!(q.take().is_none());
        assert!(matches!(rx.try_recv(), Ok(Output::Placed(w)) if w == "a/1"));
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.expire(Duration::from_millis(5)), vec![("a/1".to_string(), 1)]);
        // Back in line; the lost worker's lease is gone.
        assert!(q.touch(&first).is_none());
        let t = q.take().unwrap();
        assert_eq!(t.id, id);
        let second = q.lease(t.id, "b/1", 10).unwrap();
        assert!(!q.finish(&first, result(), 1), "a late result of the lost lease");
        assert!(!q.finish("0123", result(), 1), "a lease never given");
        assert!(finished.try_recv().is_err());
        assert!(q.finish(&second, result(), 1));
        assert!(matches!(finished.try_recv(), Ok(Finished::Done { worker, .. }) if worker == "b/1"));
        assert!(!q.finish(&second, result(), 1), "a second result for the same lease");
        assert!(q.is_idle());
    }
}
