//! The waiter's bookkeeping, free of any database: which barriers jobs wait for, when each is
//! due for its next check, which have been seen committed and wait for a proof of durability,
//! which transactions a watcher waits on, which deliveries wait in their fetch slots and which
//! are parked, and who hears what answer.

use super::Answer;
use crate::backend::{CheckSchedule, Checked, Hint, Pending, Verdict};
use crate::worker::parking::Release;
use faktory::Job;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// One delivery waiting for its barrier's verdict: how to answer it, and its job (so that it
/// can be parked; `None`: it cannot be).
pub(super) struct Delivery {
    pub(super) reply: oneshot::Sender<Answer>,
    pub(super) job: Option<Box<Job>>,
    /// The delivery's job digest, when it asks to have the barrier's compared with it.
    pub(super) digest: Option<String>,
}

impl Delivery {
    /// What this delivery hears when its barrier's fate is `answer`, the barrier's job digest
    /// being `row` (when a check read it): a commit is [`Answer::Bound`] to a job with the
    /// same digest, [`Answer::Foreign`] to one with another.
    fn answer(&self, answer: Answer, row: Option<&str>) -> Answer {
        match (answer, row, self.digest.as_deref()) {
            (Answer::Committed, Some(row), Some(mine)) if row == mine => Answer::Bound,
            (Answer::Committed, Some(_), Some(_)) => Answer::Foreign,
            (answer, _, _) => answer,
        }
    }
}

/// How many deliveries may wait, and how.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Deliveries that may wait in their fetch slots for running transactions.
    pub(crate) max_waiting: usize,
    /// Of those, how many one transaction may hold: the others of a big transaction are
    /// parked (its barriers end together anyway).
    pub(crate) per_transaction: usize,
    /// Deliveries that may be parked (0: none is).
    pub(crate) max_parked: usize,
    /// How long a delivery stays parked before it is handed back.
    pub(crate) park_for: Duration,
}

impl Limits {
    /// Limits with `max_waiting` fetch slots for waiting and no parking.
    #[cfg(test)]
    pub(super) fn holding(max_waiting: usize) -> Limits {
        Limits {
            max_waiting,
            per_transaction: max_waiting,
            max_parked: 0,
            park_for: Duration::from_secs(30),
        }
    }
}

/// When a check saw a barrier committed before its commit was proven durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Seen {
    /// On the commit clock: a worker write begun later and committed proves it durable.
    pub(super) clock: u64,
    /// Where the database's log stood (`Checked::position`): once the flushed position
    /// reaches it, the commit is durable.
    pub(super) position: Option<u64>,
}

/// Which barriers are thought to end together: the producer's transaction id from the job's
/// descriptor (untrusted, so only a hint of whom to check together), or the barrier itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Group {
    Transaction(String),
    Barrier(uuid::Uuid),
}

struct Entry {
    txid: Option<String>,
    since: Instant,
    /// Whether a check found its transaction still running (until then it may well be
    /// committed already, and does not count against `max_waiting`).
    running: bool,
    /// Seen committed, not yet proven durable.
    seen: Option<Seen>,
    /// The job digest stored with the barrier, once a check read it.
    digest: Option<String>,
    /// When a check last named it.
    checked: Option<Instant>,
    /// When it is due for its next check, and the interval that led there.
    next_check: Instant,
    interval: Duration,
    deliveries: Vec<Delivery>,
    /// Deliveries acknowledged, their jobs kept until the verdict, and since when.
    parked: Vec<Job>,
    parked_since: Option<Instant>,
}

impl Entry {
    fn group(&self, id: uuid::Uuid) -> Group {
        match &self.txid {
            Some(txid) => Group::Transaction(txid.clone()),
            None => Group::Barrier(id),
        }
    }
}

/// The pending set.
pub(super) struct PendingSet {
    entries: HashMap<uuid::Uuid, Entry>,
    schedule: CheckSchedule,
    limits: Limits,
    /// Groups a watcher waits on: their barriers are checked only at the schedule's longest
    /// interval, as the watcher's wake-up makes up for the rest.
    watched: HashSet<Group>,
    /// How many deliveries are parked.
    parked: usize,
    /// Parked jobs whose fate is decided, for the waiter to release.
    released: Vec<(Vec<Job>, Release)>,
}

impl PendingSet {
    pub(super) fn new(schedule: CheckSchedule, limits: Limits) -> PendingSet {
        PendingSet {
            entries: HashMap::new(),
            schedule,
            limits,
            watched: HashSet::new(),
            parked: 0,
            released: Vec::new(),
        }
    }

    /// How many deliveries are parked.
    pub(super) fn parked(&self) -> usize {
        self.parked
    }

    /// The parked jobs whose fate was decided since the last call.
    pub(super) fn take_released(&mut self) -> Vec<(Vec<Job>, Release)> {
        std::mem::take(&mut self.released)
    }

    /// Hands back the jobs parked longer than the limit allows, their transactions still
    /// running.
    pub(super) fn age_parked(&mut self, now: Instant) {
        for e in self.entries.values_mut() {
            if e.parked_since
                .is_some_and(|since| now >= since + self.limits.park_for)
            {
                let jobs: Vec<Job> = std::mem::take(&mut e.parked);
                self.parked -= jobs.len();
                e.parked_since = None;
                self.released.push((jobs, Release::Aged));
            }
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Registers a job's interest in barrier `id`; a barrier new to the set is due for a check
    /// at once.
    pub(super) fn add(
        &mut self,
        id: uuid::Uuid,
        txid: Option<String>,
        delivery: Delivery,
        now: Instant,
    ) {
        let schedule = self.schedule;
        self.entries
            .entry(id)
            .or_insert_with(|| Entry {
                txid,
                since: now,
                running: false,
                seen: None,
                digest: None,
                checked: None,
                next_check: now,
                interval: schedule.first / 2,
                deliveries: Vec::new(),
                parked: Vec::new(),
                parked_since: None,
            })
            .deliveries
            .push(delivery);
    }

    /// Forgets the jobs that stopped waiting (their receivers are gone), and the barriers no
    /// job waits for any more (neither in a fetch slot nor parked).
    pub(super) fn prune(&mut self) {
        self.entries.retain(|_, e| {
            e.deliveries.retain(|d| !d.reply.is_closed());
            !e.deliveries.is_empty() || !e.parked.is_empty()
        });
    }

    /// The barriers due for a check at `now` (not those seen committed: they wait for a proof),
    /// as handed to the backend. When some are due, every barrier due within half the
    /// schedule's longest interval comes along: barriers that registered at different times,
    /// or back off at different paces, are checked in the same rounds from then on, instead of
    /// in a round each.
    ///
    /// Barriers of a transaction that checks found running wait together: one of them stands
    /// for all in each round (the one checked longest ago, so that they take turns), and once
    /// it is found ended, or a hint names the transaction, all are checked, each on its own
    /// row. The transaction id comes from the job and is only trusted to say whom to check
    /// together: a job that names a transaction it does not belong to can delay the others'
    /// verdicts by the rounds it stands for them, never decide them.
    pub(super) fn due(&self, now: Instant) -> Vec<Pending> {
        if !self
            .entries
            .values()
            .any(|e| e.seen.is_none() && e.next_check <= now)
        {
            return Vec::new();
        }
        let horizon = now + self.schedule.max / 2;
        let mut batch = Vec::new();
        let mut standing: HashMap<&str, (uuid::Uuid, Option<Instant>)> = HashMap::new();
        for (id, e) in &self.entries {
            if e.seen.is_some() || e.next_check > horizon {
                continue;
            }
            match (&e.txid, e.running) {
                (Some(txid), true) => {
                    let slot = standing.entry(txid).or_insert((*id, e.checked));
                    if e.checked < slot.1 {
                        *slot = (*id, e.checked);
                    }
                }
                _ => batch.push(Pending {
                    id: *id,
                    txid: e.txid.clone(),
                }),
            }
        }
        batch.extend(standing.into_iter().map(|(txid, (id, _))| Pending {
            id,
            txid: Some(txid.to_owned()),
        }));
        batch
    }

    /// When the next check is due, if any barrier waits for one.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.seen.is_none())
            .map(|e| e.next_check)
            .min()
    }

    /// Keeps the job digests a check of `batch` read with the barriers it found committed.
    pub(super) fn read_digests(&mut self, batch: &[Pending], checked: &Checked) {
        for (i, p) in batch.iter().enumerate() {
            if let (Some(digest), Some(entry)) = (checked.digest(i), self.entries.get_mut(&p.id)) {
                entry.digest = Some(digest.to_owned());
            }
        }
    }

    /// Makes the barriers of the hinted groups (the transactions that may have ended: named,
    /// or those of the barriers named) due for a check now. What nobody waits for is ignored:
    /// a job fetched later is checked when it registers.
    pub(super) fn hint(&mut self, hints: &[Hint], now: Instant) {
        let groups: HashSet<Group> = hints
            .iter()
            .filter_map(|hint| match hint {
                Hint::Barrier(id) => self.entries.get(id).map(|e| e.group(*id)),
            })
            .collect();
        if groups.is_empty() {
            return;
        }
        for (id, e) in &mut self.entries {
            if groups.contains(&e.group(*id)) {
                e.next_check = e.next_check.min(now);
                // Checked each on its own row, no longer through one standing for all.
                e.running = false;
            }
        }
    }

    /// Makes every barrier that waits for a check due now.
    pub(super) fn all_due(&mut self, now: Instant) {
        for e in self.entries.values_mut() {
            e.next_check = e.next_check.min(now);
        }
    }

    /// Applies the verdicts of a check of `batch` made at `now`: answers what they decide,
    /// records what was seen committed (at `seen`, on the commit clock; `position` on the
    /// backend's log), and schedules the next check of what still runs. Deliveries of running
    /// transactions wait in their fetch slots up to the limits (`max_waiting` in all,
    /// `per_transaction` each); beyond them they are parked, or, when parking is full or off,
    /// answered [`Answer::Overflow`].
    pub(super) fn apply(
        &mut self,
        batch: &[Pending],
        verdicts: &[Verdict],
        seen: u64,
        position: Option<u64>,
        now: Instant,
    ) {
        // What waits in fetch slots for running transactions, outside this batch.
        let in_batch: HashSet<uuid::Uuid> = batch.iter().map(|p| p.id).collect();
        let mut held = 0;
        let mut held_by: HashMap<Group, usize> = HashMap::new();
        for (id, e) in &self.entries {
            if e.running && !in_batch.contains(id) {
                held += e.deliveries.len();
                *held_by.entry(e.group(*id)).or_default() += e.deliveries.len();
            }
        }
        // Transactions whose barriers wait together: when the one checked for them was found
        // running, when the others are due next; when it was found ended, all are checked.
        let mut running_groups: HashMap<String, (Instant, Duration)> = HashMap::new();
        let mut ended_groups: HashSet<String> = HashSet::new();
        // The barriers that stood for their transaction in this batch.
        let mut standing: HashSet<uuid::Uuid> = HashSet::new();
        for (p, verdict) in batch.iter().zip(verdicts) {
            if let Some(entry) = self.entries.get_mut(&p.id) {
                entry.checked = Some(now);
                if let (Some(txid), true) = (&entry.txid, entry.running) {
                    standing.insert(p.id);
                    if *verdict != Verdict::Pending {
                        ended_groups.insert(txid.clone());
                    }
                }
            }
            match verdict {
                Verdict::Committed => self.answer(&p.id, Answer::Committed),
                Verdict::NotCommitted => self.answer(&p.id, Answer::NotCommitted),
                Verdict::Visible => {
                    if let Some(entry) = self.entries.get_mut(&p.id) {
                        entry.seen = Some(Seen {
                            clock: seen,
                            position,
                        });
                    }
                }
                Verdict::Pending => {
                    let Some(entry) = self.entries.get_mut(&p.id) else {
                        continue;
                    };
                    entry.running = true;
                    let group = entry.group(p.id);
                    // Each delivery waits in its fetch slot only if there is room.
                    let group_held = held_by.entry(group.clone()).or_default();
                    let mut kept = Vec::with_capacity(entry.deliveries.len());
                    for d in entry.deliveries.drain(..) {
                        if held < self.limits.max_waiting
                            && *group_held < self.limits.per_transaction
                        {
                            held += 1;
                            *group_held += 1;
                            kept.push(d);
                        } else if d.job.is_some() && self.parked < self.limits.max_parked {
                            if d.reply.send(Answer::Parked).is_ok() {
                                entry.parked.extend(d.job.map(|j| *j));
                                entry.parked_since.get_or_insert(now);
                                self.parked += 1;
                            }
                        } else {
                            let _ = d.reply.send(Answer::Overflow);
                        }
                    }
                    entry.deliveries = kept;
                    entry.interval = if self.watched.contains(&group) {
                        self.schedule.max
                    } else {
                        self.schedule.after(entry.interval)
                    };
                    entry.next_check = now + entry.interval;
                    if let (Some(txid), true) = (&entry.txid, standing.contains(&p.id)) {
                        running_groups.insert(txid.clone(), (entry.next_check, entry.interval));
                    }
                }
            }
        }
        for (id, e) in &mut self.entries {
            let Some(txid) = &e.txid else { continue };
            if !e.running || e.seen.is_some() || standing.contains(id) {
                continue;
            }
            if ended_groups.contains(txid) {
                e.running = false;
                e.next_check = now;
            } else if let Some((next_check, interval)) = running_groups.get(txid) {
                e.next_check = *next_check;
                e.interval = *interval;
            }
        }
        // Barriers whose every delivery was turned away are forgotten.
        self.entries
            .retain(|_, e| !e.deliveries.is_empty() || !e.parked.is_empty());
    }

    /// The barriers seen committed whose durability is not proven yet.
    pub(super) fn unproven(&self) -> Vec<(uuid::Uuid, Seen)> {
        self.entries
            .iter()
            .filter_map(|(id, e)| e.seen.map(|seen| (*id, seen)))
            .collect()
    }

    /// Up to `n` groups worth a watcher, the youngest first (most transactions end soon after
    /// they push): groups no watcher waits on yet, found running by a check. Each comes with
    /// the barrier to wait on (its newest: most likely of the transaction still running) and
    /// how long the group has waited.
    pub(super) fn watch_candidates(
        &self,
        n: usize,
        now: Instant,
    ) -> Vec<(Group, uuid::Uuid, Duration)> {
        let mut newest: HashMap<Group, (uuid::Uuid, Instant, Instant)> = HashMap::new();
        for (id, e) in &self.entries {
            if !e.running || e.seen.is_some() {
                continue;
            }
            let group = e.group(*id);
            if self.watched.contains(&group) {
                continue;
            }
            let slot = newest.entry(group).or_insert((*id, e.since, e.since));
            if e.since > slot.1 {
                (slot.0, slot.1) = (*id, e.since);
            }
            slot.2 = slot.2.min(e.since);
        }
        let mut groups: Vec<(Group, uuid::Uuid, Instant, Instant)> = newest
            .into_iter()
            .map(|(g, (id, newest, oldest))| (g, id, newest, oldest))
            .collect();
        groups.sort_by_key(|g| std::cmp::Reverse(g.2));
        groups
            .into_iter()
            .take(n)
            .map(|(g, id, _, oldest)| (g, id, now.saturating_duration_since(oldest)))
            .collect()
    }

    /// Marks `group` watched (or no longer).
    pub(super) fn set_watched(&mut self, group: Group, watched: bool) {
        if watched {
            self.watched.insert(group);
        } else {
            self.watched.remove(&group);
        }
    }

    /// Tells every job waiting for barrier `id` the answer (its parked jobs are released
    /// accordingly), and forgets it.
    pub(super) fn answer(&mut self, id: &uuid::Uuid, answer: Answer) {
        if let Some(entry) = self.entries.remove(id) {
            tracing::trace!(barrier_id = %id, ?answer, waited = ?entry.since.elapsed(), "barrier answered");
            self.conclude(entry, answer);
        }
    }

    /// Tells every waiting job the answer, and forgets them all.
    pub(super) fn answer_all(&mut self, answer: Answer) {
        let entries: Vec<Entry> = self.entries.drain().map(|(_, e)| e).collect();
        for entry in entries {
            self.conclude(entry, answer);
        }
        self.watched.clear();
    }

    fn conclude(&mut self, entry: Entry, answer: Answer) {
        for d in entry.deliveries {
            let answer = d.answer(answer, entry.digest.as_deref());
            let _ = d.reply.send(answer);
        }
        if entry.parked.is_empty() {
            return;
        }
        let why = match answer {
            Answer::Committed => Release::Committed,
            Answer::NotCommitted => Release::NotCommitted,
            _ => Release::ShuttingDown,
        };
        self.parked -= entry.parked.len();
        self.released.push((entry.parked, why));
    }
}

#[cfg(test)]
mod tests;
