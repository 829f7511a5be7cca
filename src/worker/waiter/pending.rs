//! The waiter's bookkeeping, free of any database: which barriers jobs wait for, when each is
//! due for its next check, which have been seen committed and wait for a proof of durability,
//! which transactions a watcher waits on, and who hears what answer.

use super::Answer;
use crate::backend::{CheckSchedule, Pending, Verdict};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

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
    /// When it is due for its next check, and the interval that led there.
    next_check: Instant,
    interval: Duration,
    replies: Vec<oneshot::Sender<Answer>>,
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
    /// How many jobs may wait for running transactions.
    max_waiting: usize,
    /// Groups a watcher waits on: their barriers are checked only at the schedule's longest
    /// interval, as the watcher's wake-up makes up for the rest.
    watched: HashSet<Group>,
}

impl PendingSet {
    pub(super) fn new(schedule: CheckSchedule, max_waiting: usize) -> PendingSet {
        PendingSet {
            entries: HashMap::new(),
            schedule,
            max_waiting,
            watched: HashSet::new(),
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
        reply: oneshot::Sender<Answer>,
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
                next_check: now,
                interval: schedule.first / 2,
                replies: Vec::new(),
            })
            .replies
            .push(reply);
    }

    /// Forgets the jobs that stopped waiting (their receivers are gone), and the barriers no
    /// job waits for any more.
    pub(super) fn prune(&mut self) {
        self.entries.retain(|_, e| {
            e.replies.retain(|r| !r.is_closed());
            !e.replies.is_empty()
        });
    }

    /// The barriers due for a check at `now` (not those seen committed: they wait for a proof),
    /// as handed to the backend. When some are due, every barrier due within half the
    /// schedule's longest interval comes along: barriers that registered at different times,
    /// or back off at different paces, are checked in the same rounds from then on, instead of
    /// in a round each.
    pub(super) fn due(&self, now: Instant) -> Vec<Pending> {
        if !self
            .entries
            .values()
            .any(|e| e.seen.is_none() && e.next_check <= now)
        {
            return Vec::new();
        }
        self.entries
            .iter()
            .filter(|(_, e)| e.seen.is_none() && e.next_check <= now + self.schedule.max / 2)
            .map(|(id, e)| Pending {
                id: *id,
                txid: e.txid.clone(),
            })
            .collect()
    }

    /// When the next check is due, if any barrier waits for one.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter(|e| e.seen.is_none())
            .map(|e| e.next_check)
            .min()
    }

    /// Makes the barriers of the groups of `ids` (hinted: their transactions may have ended)
    /// due for a check now. Ids nobody waits for are ignored: a job fetched later is checked
    /// when it registers.
    pub(super) fn hint(&mut self, ids: &[uuid::Uuid], now: Instant) {
        let groups: HashSet<Group> = ids
            .iter()
            .filter_map(|id| self.entries.get(id).map(|e| e.group(*id)))
            .collect();
        if groups.is_empty() {
            return;
        }
        for (id, e) in &mut self.entries {
            if groups.contains(&e.group(*id)) {
                e.next_check = e.next_check.min(now);
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
    /// backend's log), and schedules the next check of what still runs. A barrier found
    /// running for the first time while `max_waiting` barriers already wait for running
    /// transactions is answered [`Answer::Overflow`].
    pub(super) fn apply(
        &mut self,
        batch: &[Pending],
        verdicts: &[Verdict],
        seen: u64,
        position: Option<u64>,
        now: Instant,
    ) {
        let mut running = self.entries.values().filter(|e| e.running).count();
        for (p, verdict) in batch.iter().zip(verdicts) {
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
                    if !entry.running {
                        // Found running for the first time: it waits only if there is room.
                        if running >= self.max_waiting {
                            self.answer(&p.id, Answer::Overflow);
                            continue;
                        }
                        entry.running = true;
                        running += 1;
                    }
                    let group = entry.group(p.id);
                    entry.interval = if self.watched.contains(&group) {
                        self.schedule.max
                    } else {
                        self.schedule.after(entry.interval)
                    };
                    entry.next_check = now + entry.interval;
                }
            }
        }
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

    /// Tells every job waiting for barrier `id` the answer, and forgets it.
    pub(super) fn answer(&mut self, id: &uuid::Uuid, answer: Answer) {
        if let Some(entry) = self.entries.remove(id) {
            tracing::trace!(barrier_id = %id, ?answer, waited = ?entry.since.elapsed(), "barrier answered");
            for r in entry.replies {
                let _ = r.send(answer);
            }
        }
    }

    /// Tells every waiting job the answer, and forgets them all.
    pub(super) fn answer_all(&mut self, answer: Answer) {
        for (_, entry) in self.entries.drain() {
            for r in entry.replies {
                let _ = r.send(answer);
            }
        }
        self.watched.clear();
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
        PendingSet::new(SCHEDULE, max_waiting)
    }

    fn register(
        set: &mut PendingSet,
        txid: Option<&str>,
        now: Instant,
    ) -> (uuid::Uuid, oneshot::Receiver<Answer>) {
        let id = uuid::Uuid::new_v4();
        let (tx, rx) = oneshot::channel();
        set.add(id, txid.map(String::from), tx, now);
        (id, rx)
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
        let mut set = PendingSet::new(CheckSchedule::every(Duration::from_millis(200)), 8);
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
        set.add(id, None, a, t0);
        set.add(id, None, b, t0);
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
        set.hint(&[a, uuid::Uuid::new_v4()], later);
        let due = ids(&set.due(later));
        assert!(
            due.contains(&a) && due.contains(&b),
            "the hinted transaction"
        );
        let _ = other;
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
}
