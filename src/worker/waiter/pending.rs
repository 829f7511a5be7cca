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
                Hint::Transaction(txid) => Some(Group::Transaction(txid.clone())),
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
mod tests {
    use super::*;

    const SCHEDULE: CheckSchedule = CheckSchedule {
        first: Duration::from_millis(2),
        max: Duration::from_millis(100),
    };

    fn set(max_waiting: usize) -> PendingSet {
        PendingSet::new(SCHEDULE, Limits::holding(max_waiting))
    }

    fn register(
        set: &mut PendingSet,
        txid: Option<&str>,
        now: Instant,
    ) -> (uuid::Uuid, oneshot::Receiver<Answer>) {
        let id = uuid::Uuid::new_v4();
        let (tx, rx) = oneshot::channel();
        set.add(id, txid.map(String::from), delivery(tx, None), now);
        (id, rx)
    }

    fn delivery(reply: oneshot::Sender<Answer>, job: Option<Job>) -> Delivery {
        Delivery {
            reply,
            job: job.map(Box::new),
            digest: None,
        }
    }

    fn ids(pending: &[Pending]) -> HashSet<uuid::Uuid> {
        pending.iter().map(|p| p.id).collect()
    }

    fn check(set: &mut PendingSet, now: Instant, verdict: Verdict) -> Vec<Pending> {
        let batch = set.due(now);
        let verdicts = vec![verdict; batch.len()];
        set.apply(&batch, &verdicts, 0, None, now);
        batch
    }

    #[test]
    fn a_new_barrier_is_due_at_once_and_then_backs_off() {
        let t0 = Instant::now();
        let mut set = set(8);
        let (id, mut rx) = register(&mut set, None, t0);
        assert_eq!(ids(&check(&mut set, t0, Verdict::Pending)), [id].into());
        // 2 ms, then 4, 8, ... up to the longest interval.
        let mut at = t0;
        let mut gaps = Vec::new();
        for _ in 0..8 {
            let next = set.next_due().unwrap();
            assert!(set.due(next - Duration::from_micros(1)).is_empty());
            gaps.push(next - at);
            at = next;
            check(&mut set, at, Verdict::Pending);
        }
        let ms: Vec<u128> = gaps.iter().map(Duration::as_millis).collect();
        assert_eq!(ms, [2, 4, 8, 16, 32, 64, 100, 100]);
        assert!(rx.try_recv().is_err(), "no answer while it runs");
        let next = set.next_due().unwrap();
        check(&mut set, next, Verdict::Committed);
        assert_eq!(rx.try_recv(), Ok(Answer::Committed));
        assert!(set.is_empty());
    }

    #[test]
    fn barriers_registered_apart_are_checked_together() {
        let t0 = Instant::now();
        let mut set = set(16);
        let ids: Vec<uuid::Uuid> = (0..10)
            .map(|i| register(&mut set, None, t0 + Duration::from_millis(i)).0)
            .collect();
        // Checked as they registered, a millisecond apart.
        for i in 0..10 {
            check(&mut set, t0 + Duration::from_millis(i), Verdict::Pending);
        }
        // Later rounds take every barrier due within half its interval: after a few, one round
        // checks them all.
        let mut at = t0;
        let mut sizes = Vec::new();
        for _ in 0..8 {
            at = set.next_due().unwrap();
            sizes.push(check(&mut set, at, Verdict::Pending).len());
        }
        assert_eq!(sizes.last(), Some(&ids.len()), "{sizes:?}");
        assert!(set.due(at + SCHEDULE.max / 4).is_empty());
    }

    #[test]
    fn a_steady_schedule_keeps_its_pace() {
        let t0 = Instant::now();
        let mut set = PendingSet::new(
            CheckSchedule::every(Duration::from_millis(200)),
            Limits::holding(8),
        );
        register(&mut set, None, t0);
        check(&mut set, t0, Verdict::Pending);
        assert_eq!(set.next_due(), Some(t0 + Duration::from_millis(200)));
        check(&mut set, t0 + Duration::from_millis(200), Verdict::Pending);
        assert_eq!(set.next_due(), Some(t0 + Duration::from_millis(400)));
    }

    #[test]
    fn several_jobs_of_one_barrier_hear_one_answer() {
        let t0 = Instant::now();
        let mut set = set(8);
        let id = uuid::Uuid::new_v4();
        let (a, mut ra) = oneshot::channel();
        let (b, mut rb) = oneshot::channel();
        set.add(id, None, delivery(a, None), t0);
        set.add(id, None, delivery(b, None), t0);
        assert_eq!(set.due(t0).len(), 1);
        assert_eq!(check(&mut set, t0, Verdict::NotCommitted).len(), 1);
        assert_eq!(ra.try_recv(), Ok(Answer::NotCommitted));
        assert_eq!(rb.try_recv(), Ok(Answer::NotCommitted));
    }

    #[test]
    fn jobs_that_stopped_waiting_are_forgotten() {
        let t0 = Instant::now();
        let mut set = set(8);
        let (_, rx) = register(&mut set, None, t0);
        let (kept, _rx) = register(&mut set, None, t0);
        drop(rx);
        set.prune();
        assert_eq!(ids(&set.due(t0)), [kept].into());
    }

    #[test]
    fn only_max_waiting_barriers_wait_for_running_transactions() {
        let t0 = Instant::now();
        let mut set = set(2);
        let mut receivers: Vec<_> = (0..3).map(|_| register(&mut set, None, t0).1).collect();
        // A committed one never counts.
        let (_, mut committed) = register(&mut set, None, t0);
        let batch = set.due(t0);
        let verdicts: Vec<Verdict> = batch
            .iter()
            .enumerate()
            .map(|(i, _)| {
                if i == 0 {
                    Verdict::Committed
                } else {
                    Verdict::Pending
                }
            })
            .collect();
        set.apply(&batch, &verdicts, 0, None, t0);
        let answers: Vec<Answer> = receivers
            .iter_mut()
            .chain([&mut committed])
            .filter_map(|rx| rx.try_recv().ok())
            .collect();
        assert_eq!(answers.len(), 2, "{answers:?}");
        assert!(answers.contains(&Answer::Committed));
        assert!(answers.contains(&Answer::Overflow));
        assert_eq!(set.entries.len(), 2);
    }

    #[test]
    fn a_visible_barrier_waits_for_its_proof_without_checks() {
        let t0 = Instant::now();
        let mut set = set(8);
        let (id, mut rx) = register(&mut set, None, t0);
        let batch = set.due(t0);
        set.apply(&batch, &[Verdict::Visible], 42, Some(7), t0);
        assert_eq!(
            set.unproven(),
            [(
                id,
                Seen {
                    clock: 42,
                    position: Some(7)
                }
            )]
        );
        assert!(set.due(t0 + Duration::from_secs(60)).is_empty());
        assert_eq!(set.next_due(), None);
        set.answer(&id, Answer::Committed);
        assert_eq!(rx.try_recv(), Ok(Answer::Committed));
    }

    #[test]
    fn a_hint_makes_the_whole_transaction_due() {
        let t0 = Instant::now();
        let mut set = set(8);
        let (a, _ra) = register(&mut set, Some("17"), t0);
        let (b, _rb) = register(&mut set, Some("17"), t0);
        let (other, _ro) = register(&mut set, Some("18"), t0);
        check(&mut set, t0, Verdict::Pending);
        let later = t0 + Duration::from_micros(500);
        assert!(set.due(later).is_empty());
        set.hint(
            &[Hint::Barrier(a), Hint::Barrier(uuid::Uuid::new_v4())],
            later,
        );
        let due = ids(&set.due(later));
        assert!(
            due.contains(&a) && due.contains(&b),
            "the hinted transaction"
        );
        let _ = other;
        // A hint that names the transaction does the same.
        check(&mut set, later, Verdict::Pending);
        let even_later = later + Duration::from_micros(500);
        assert!(set.due(even_later).is_empty());
        set.hint(&[Hint::Transaction("17".into())], even_later);
        let due = ids(&set.due(even_later));
        assert!(due.contains(&a) && due.contains(&b));
    }

    #[test]
    fn watchers_go_to_the_youngest_running_transactions() {
        let t0 = Instant::now();
        let mut set = set(16);
        let (_old_a, _r1) = register(&mut set, Some("1"), t0);
        let (old_b, _r2) = register(&mut set, Some("1"), t0 + Duration::from_millis(1));
        let (young, _r3) = register(&mut set, Some("2"), t0 + Duration::from_millis(5));
        let (unchecked, _r4) = register(&mut set, Some("3"), t0 + Duration::from_millis(6));
        let now = t0 + Duration::from_millis(5);
        let batch: Vec<Pending> = set
            .due(now)
            .into_iter()
            .filter(|p| p.id != unchecked)
            .collect();
        let verdicts = vec![Verdict::Pending; batch.len()];
        set.apply(&batch, &verdicts, 0, None, now);
        let picked = set.watch_candidates(8, now + Duration::from_millis(5));
        let picked_ids: Vec<uuid::Uuid> = picked.iter().map(|(_, id, _)| *id).collect();
        // Transaction 2 is the youngest; transaction 1 is watched through its newest barrier,
        // and has waited since its oldest; transaction 3 was never found running.
        assert_eq!(picked_ids, [young, old_b]);
        assert_eq!(picked[1].2, Duration::from_millis(10));
        set.set_watched(picked[0].0.clone(), true);
        let picked = set.watch_candidates(8, now);
        assert_eq!(
            picked.iter().map(|(_, id, _)| *id).collect::<Vec<_>>(),
            [old_b]
        );
        // A watched transaction's barriers are checked at the longest interval from then on.
        let young_due = now + SCHEDULE.first;
        assert!(ids(&set.due(young_due)).contains(&young));
        check(&mut set, young_due, Verdict::Pending);
        assert!(!ids(&set.due(young_due + SCHEDULE.max / 4)).contains(&young));
        assert!(ids(&set.due(young_due + SCHEDULE.max)).contains(&young));
    }

    #[test]
    fn a_big_transaction_holds_a_few_slots_and_parks_the_rest() {
        let t0 = Instant::now();
        let mut set = PendingSet::new(
            SCHEDULE,
            Limits {
                max_waiting: 8,
                per_transaction: 2,
                max_parked: 5,
                park_for: Duration::from_secs(30),
            },
        );
        let mut replies = Vec::new();
        for i in 0..10 {
            let (tx, rx) = oneshot::channel();
            let job = Job::new("kind", vec![i]);
            set.add(
                uuid::Uuid::new_v4(),
                Some("7".into()),
                delivery(tx, Some(job)),
                t0,
            );
            replies.push(rx);
        }
        check(&mut set, t0, Verdict::Pending);
        let answers: Vec<Option<Answer>> =
            replies.iter_mut().map(|rx| rx.try_recv().ok()).collect();
        let held = answers.iter().filter(|a| a.is_none()).count();
        let parked = answers
            .iter()
            .filter(|a| **a == Some(Answer::Parked))
            .count();
        let overflowed = answers
            .iter()
            .filter(|a| **a == Some(Answer::Overflow))
            .count();
        assert_eq!((held, parked, overflowed), (2, 5, 3), "{answers:?}");
        assert_eq!(set.parked(), 5);
        // The transaction commits: the held ones hear it, the parked ones are released (one
        // barrier stands for the transaction, then the others are checked).
        for _ in 0..2 {
            let next = set.next_due().unwrap();
            check(&mut set, next, Verdict::Committed);
        }
        let released = set.take_released();
        let jobs: usize = released.iter().map(|(jobs, _)| jobs.len()).sum();
        assert_eq!(jobs, 5);
        assert!(released.iter().all(|(_, why)| *why == Release::Committed));
        assert_eq!(set.parked(), 0);
        assert!(
            set.is_empty(),
            "nothing left: {} entries",
            set.entries.len()
        );
    }

    #[test]
    fn parked_jobs_go_back_when_their_transaction_fails_runs_too_long_or_the_worker_stops() {
        let t0 = Instant::now();
        let limits = Limits {
            max_waiting: 0,
            per_transaction: 0,
            max_parked: 100,
            park_for: Duration::from_secs(30),
        };
        let mut set = PendingSet::new(SCHEDULE, limits);
        let park = |set: &mut PendingSet, txid: &str| {
            let (tx, rx) = oneshot::channel();
            set.add(
                uuid::Uuid::new_v4(),
                Some(txid.into()),
                delivery(tx, Some(Job::new("kind", vec![1]))),
                t0,
            );
            rx
        };
        let _rolls_back = park(&mut set, "1");
        let _runs_long = park(&mut set, "2");
        check(&mut set, t0, Verdict::Pending);
        assert_eq!(set.parked(), 2);
        // A parked job needs no reply channel: it stays.
        set.prune();
        assert_eq!(set.parked(), 2);
        // Transaction 1 rolls back.
        let batch: Vec<Pending> = set
            .due(set.next_due().unwrap())
            .into_iter()
            .filter(|p| p.txid.as_deref() == Some("1"))
            .collect();
        set.apply(&batch, &[Verdict::NotCommitted], 0, None, t0);
        let released = set.take_released();
        assert_eq!(released.len(), 1);
        assert_eq!(released[0].1, Release::NotCommitted);
        // Transaction 2 runs past the limit.
        set.age_parked(t0 + Duration::from_secs(29));
        assert!(set.take_released().is_empty());
        set.age_parked(t0 + Duration::from_secs(30));
        let released = set.take_released();
        assert_eq!((released.len(), released[0].1), (1, Release::Aged));
        assert_eq!(set.parked(), 0);
        // Parked again, then the worker stops.
        let _again = park(&mut set, "3");
        let next = set.next_due().unwrap();
        check(&mut set, next, Verdict::Pending);
        assert_eq!(set.parked(), 1);
        set.answer_all(Answer::ShuttingDown);
        let released = set.take_released();
        assert_eq!(released[0].1, Release::ShuttingDown);
    }

    #[test]
    fn shutting_down_answers_everyone() {
        let t0 = Instant::now();
        let mut set = set(8);
        let (_, mut a) = register(&mut set, None, t0);
        let (_, mut b) = register(&mut set, Some("1"), t0);
        set.answer_all(Answer::ShuttingDown);
        assert_eq!(a.try_recv(), Ok(Answer::ShuttingDown));
        assert_eq!(b.try_recv(), Ok(Answer::ShuttingDown));
        assert!(set.is_empty());
    }

    #[test]
    fn a_running_transaction_is_checked_through_one_barrier_at_a_time() {
        let t0 = Instant::now();
        let mut set = set(100);
        let mut replies: Vec<(uuid::Uuid, oneshot::Receiver<Answer>)> =
            (0..50).map(|_| register(&mut set, Some("9"), t0)).collect();
        // Checked each on its own row as they arrive.
        assert_eq!(check(&mut set, t0, Verdict::Pending).len(), 50);
        // Then one stands for them all, a different one each round.
        let mut stood = HashSet::new();
        for _ in 0..10 {
            let next = set.next_due().unwrap();
            let batch = check(&mut set, next, Verdict::Pending);
            assert_eq!(batch.len(), 1, "{batch:?}");
            stood.insert(batch[0].id);
        }
        assert_eq!(stood.len(), 10, "they take turns");
        // It is found committed: the next round checks every one of them.
        let next = set.next_due().unwrap();
        assert_eq!(check(&mut set, next, Verdict::Committed).len(), 1);
        let rest = set.due(next);
        assert_eq!(rest.len(), 49);
        set.apply(&rest, &[Verdict::Committed; 49], 0, None, next);
        for (_, rx) in &mut replies {
            assert_eq!(rx.try_recv(), Ok(Answer::Committed));
        }
        assert!(set.is_empty());
    }

    #[test]
    fn a_job_that_names_the_wrong_transaction_decides_nothing_for_the_others() {
        let t0 = Instant::now();
        let mut set = set(100);
        let honest: Vec<_> = (0..3).map(|_| register(&mut set, Some("9"), t0)).collect();
        let (forged, mut forged_rx) = register(&mut set, Some("9"), t0);
        check(&mut set, t0, Verdict::Pending);
        // Rounds until the forged one stands for the transaction, found not committed (its
        // row was never written): the others are then checked on their own rows, and still run.
        let at = loop {
            let at = set.next_due().unwrap();
            let batch = set.due(at);
            assert_eq!(batch.len(), 1);
            if batch[0].id == forged {
                set.apply(&batch, &[Verdict::NotCommitted], 0, None, at);
                break at;
            }
            set.apply(&batch, &[Verdict::Pending], 0, None, at);
        };
        assert_eq!(forged_rx.try_recv(), Ok(Answer::NotCommitted));
        let rest = set.due(at);
        assert_eq!(ids(&rest), honest.iter().map(|(id, _)| *id).collect());
        set.apply(&rest, &vec![Verdict::Pending; rest.len()], 0, None, at);
        let mut honest = honest;
        for (_, rx) in &mut honest {
            assert!(rx.try_recv().is_err(), "still waiting");
        }
        // And they wait together again.
        let next = set.next_due().unwrap();
        assert_eq!(set.due(next).len(), 1);
    }

    #[test]
    fn a_hint_naming_the_transaction_checks_all_its_barriers() {
        let t0 = Instant::now();
        let mut set = set(100);
        for _ in 0..20 {
            register(&mut set, Some("5"), t0);
        }
        register(&mut set, Some("6"), t0);
        check(&mut set, t0, Verdict::Pending);
        let later = t0 + Duration::from_millis(1);
        assert!(set.due(later).is_empty());
        set.hint(&[Hint::Transaction("5".into())], later);
        let due = set.due(later);
        let of_5 = due
            .iter()
            .filter(|p| p.txid.as_deref() == Some("5"))
            .count();
        assert_eq!(of_5, 20, "{due:?}");
    }
}
