//! What a test can read from the state: queues, sets, jobs, their history, counters and
//! `INFO`.

use super::{Reservation, State};
use crate::events::{JobEvent, JobEventKind, Stats};
use crate::job::Job;
use crate::protocol::format_time;
use chrono::Utc;
use std::collections::VecDeque;
use std::time::Duration;

impl State {
    pub(crate) fn queue_size(&self, queue: &str) -> usize {
        self.queues.get(queue).map_or(0, VecDeque::len)
    }

    pub(crate) fn queue_names(&self) -> Vec<String> {
        self.queues.keys().cloned().collect()
    }

    pub(crate) fn scheduled_len(&self) -> usize {
        self.scheduled.len()
    }

    pub(crate) fn retries_len(&self) -> usize {
        self.retries.len()
    }

    pub(crate) fn dead_len(&self) -> usize {
        self.dead.len()
    }

    pub(crate) fn working_len(&self) -> usize {
        self.working.len()
    }

    pub(crate) fn stats(&self) -> Stats {
        self.stats
    }

    /// Finds a job wherever it is: reserved, queued, scheduled, retrying or dead.
    pub(crate) fn find_job(&self, jid: &str) -> Option<&Job> {
        if let Some(res) = self.working.get(jid) {
            return Some(&res.job);
        }
        self.queues
            .values()
            .flat_map(|q| q.iter())
            .chain(self.scheduled.values())
            .chain(self.retries.values())
            .chain(self.dead.values())
            .find(|j| j.jid == jid)
    }

    pub(crate) fn history(&self, jid: &str) -> Vec<JobEvent> {
        self.history.get(jid).cloned().unwrap_or_default()
    }

    pub(crate) fn has_event(&self, jid: &str, kind: JobEventKind) -> bool {
        self.history
            .get(jid)
            .is_some_and(|h| h.iter().any(|e| e.kind() == kind))
    }

    pub(crate) fn jobs_in_queue(&self, queue: &str) -> Vec<serde_json::Value> {
        self.queues
            .get(queue)
            .map(|q| q.iter().map(Job::to_value).collect())
            .unwrap_or_default()
    }

    pub(crate) fn scheduled_jobs(&self) -> Vec<serde_json::Value> {
        self.scheduled.values().map(Job::to_value).collect()
    }

    pub(crate) fn retry_jobs(&self) -> Vec<serde_json::Value> {
        self.retries.values().map(Job::to_value).collect()
    }

    pub(crate) fn dead_jobs(&self) -> Vec<serde_json::Value> {
        self.dead.values().map(Job::to_value).collect()
    }

    pub(crate) fn working_jobs(&self) -> Vec<serde_json::Value> {
        let mut res: Vec<&Reservation> = self.working.values().collect();
        res.sort_by_key(|r| r.key);
        res.into_iter().map(|r| r.job.to_value()).collect()
    }

    /// The `INFO` document, shaped like the real server's `FaktoryState`.
    pub(crate) fn info(&self, uptime: Duration, used_memory_mb: u64) -> serde_json::Value {
        let now = Utc::now();
        let queues: serde_json::Map<String, serde_json::Value> = self
            .queues
            .iter()
            .map(|(name, q)| (name.clone(), serde_json::Value::from(q.len() as u64)))
            .collect();
        let total_enqueued: usize = self.queues.values().map(VecDeque::len).sum();
        serde_json::json!({
            "now": format_time(now),
            "server_utc_time": now.format("%H:%M:%S UTC").to_string(),
            "faktory": {
                "total_failures": self.stats.failures,
                "total_processed": self.stats.processed,
                "total_enqueued": total_enqueued,
                "total_queues": self.queues.len(),
                "queues": queues,
                "tasks": {
                    "Busy": { "size": self.working.len(), "reaped": self.reaped },
                    "Workers": { "size": self.workers.len(), "reaped": self.workers_reaped },
                    "Scheduled": {
                        "size": self.scheduled.len(),
                        "cycles": self.scans.cycles,
                        "enqueued": self.scans.scheduled_enqueued,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                    "Retries": {
                        "size": self.retries.len(),
                        "cycles": self.scans.cycles,
                        "enqueued": self.scans.retries_enqueued,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                    "Dead": {
                        "size": self.dead.len(),
                        "cycles": self.scans.cycles,
                        // Dead jobs are kept until FLUSH: none is ever purged.
                        "enqueued": 0,
                        "wall_time_sec": self.scans.time.as_secs_f64(),
                    },
                },
                "sets": {
                    "scheduled": self.scheduled.len(),
                    "retries": self.retries.len(),
                    "dead": self.dead.len(),
                    "working": self.working.len(),
                },
            },
            "server": {
                "description": "Faktory test server",
                "faktory_version": crate::FAKTORY_VERSION,
                "uptime": uptime.as_secs(),
                "connections": self.connections,
                "command_count": self.commands,
                "used_memory_mb": used_memory_mb,
            },
        })
    }
}
