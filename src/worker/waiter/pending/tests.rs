//! The pending set's bookkeeping, without a database: schedules, grouping, limits, parking.
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
    let answers: Vec<Option<Answer>> = replies.iter_mut().map(|rx| rx.try_recv().ok()).collect();
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
fn a_hint_for_one_barrier_checks_all_its_transactions_barriers() {
    let t0 = Instant::now();
    let mut set = set(100);
    let watched = register(&mut set, Some("5"), t0).0;
    for _ in 0..19 {
        register(&mut set, Some("5"), t0);
    }
    register(&mut set, Some("6"), t0);
    check(&mut set, t0, Verdict::Pending);
    let later = t0 + Duration::from_millis(1);
    assert!(set.due(later).is_empty());
    set.hint(&[Hint::Barrier(watched)], later);
    let due = set.due(later);
    let of_5 = due
        .iter()
        .filter(|p| p.txid.as_deref() == Some("5"))
        .count();
    assert_eq!(of_5, 20, "{due:?}");
}

#[test]
fn a_commit_is_bound_to_the_job_whose_digest_the_check_read() {
    let t0 = Instant::now();
    let mut set = set(8);
    let id = uuid::Uuid::new_v4();
    let mut replies = Vec::new();
    for digest in [Some("d1"), Some("d2"), None] {
        let (tx, rx) = oneshot::channel();
        let mut d = delivery(tx, None);
        d.digest = digest.map(String::from);
        set.add(id, None, d, t0);
        replies.push(rx);
    }
    let batch = set.due(t0);
    set.read_digests(
        &batch,
        &Checked {
            digests: vec![Some("d1".into())],
            ..Checked::from(vec![Verdict::Committed])
        },
    );
    set.apply(&batch, &[Verdict::Committed], 0, None, t0);
    let answers: Vec<Answer> = replies
        .iter_mut()
        .map(|rx| rx.try_recv().unwrap())
        .collect();
    // The job's own delivery, one with a copied descriptor, one that asked for no comparison.
    assert_eq!(answers, [Answer::Bound, Answer::Foreign, Answer::Committed]);
}

#[test]
fn without_a_digest_read_a_commit_binds_no_one() {
    let t0 = Instant::now();
    let mut set = set(8);
    let id = uuid::Uuid::new_v4();
    let (tx, mut rx) = oneshot::channel();
    let mut d = delivery(tx, None);
    d.digest = Some("d1".into());
    set.add(id, None, d, t0);
    // A watcher's wake-up, say: committed, and no digest read.
    set.answer(&id, Answer::Committed);
    assert_eq!(rx.try_recv(), Ok(Answer::Committed));
}
