//! The state's rules, without sockets.

use super::*;
use crate::events::JobEvent;

fn cfg(delay: Duration) -> Config {
    Config {
        password: None,
        retry_delay: RetryDelay::Fixed(delay),
        fetch_timeout: Duration::from_millis(10),
        min_reserve_for: Duration::ZERO,
        max_line_length: 1024,
        heartbeat_timeout: HEARTBEAT_TIMEOUT,
    }
}

fn job(extra: &str) -> Job {
    Job::parse(format!(r#"{{"jid":"abcdefgh","jobtype":"t","args":[]{extra}}}"#).as_bytes())
        .unwrap()
}

fn kinds(state: &State, jid: &str) -> Vec<JobEventKind> {
    state.history(jid).iter().map(JobEvent::kind).collect()
}

fn later(now: &Now, d: Duration) -> Now {
    Now {
        wall: now.after(d).0,
        mono: now.after(d).1,
    }
}

#[test]
fn faktory_retry_delay_stays_within_the_formula() {
    let policy = RetryDelay::default();
    for count in [0u32, 1, 2, 5, 25] {
        let c = u64::from(count);
        let min = 15 + c.pow(4);
        let max = min + 29 * (c + 1);
        for _ in 0..200 {
            let secs = policy.delay(count).as_secs();
            assert!((min..=max).contains(&secs), "count {count}: {secs}");
        }
    }
    assert_eq!(
        RetryDelay::from(Duration::from_millis(5)).delay(7),
        Duration::from_millis(5)
    );
    assert_eq!(
        RetryDelay::custom(|n| Duration::from_secs(n.into())).delay(3),
        Duration::from_secs(3)
    );
}

#[test]
fn fail_retries_then_buries() {
    let cfg = cfg(Duration::ZERO);
    let mut s = State::default();
    let mut now = Now::get();
    s.push(job(r#","retry":2"#), &now).unwrap();
    let mut remaining = Vec::new();
    for round in 0..3 {
        assert!(
            s.fetch(&["default".into()], &now, &cfg).is_some(),
            "{round}"
        );
        s.fail("abcdefgh", None, Some(" boom ".into()), None, &now, &cfg)
            .unwrap();
        now = later(&now, Duration::from_millis(1));
        s.tick(&now, &cfg);
        if let Some(j) = s.find_job("abcdefgh") {
            let f = j.failure.clone().unwrap();
            assert_eq!(f.message, "boom");
            assert_eq!(f.errtype, "unknown");
            remaining.push((f.retry_count, f.remaining));
        }
    }
    assert_eq!(remaining, vec![(0, 2), (1, 1), (2, 0)]);
    assert_eq!(s.dead_len(), 1);
    assert_eq!(s.queue_size("default"), 0);
    assert_eq!(s.stats().failures, 3);
    use JobEventKind::*;
    assert_eq!(
        kinds(&s, "abcdefgh"),
        vec![Pushed, Fetched, Failed, Retried, Fetched, Failed, Retried, Fetched, Failed, Dead]
    );
}

#[test]
fn retry_zero_discards_and_negative_buries() {
    let cfg = cfg(Duration::ZERO);
    let now = Now::get();
    let mut s = State::default();
    s.push(job(r#","retry":0"#), &now).unwrap();
    s.fetch(&["default".into()], &now, &cfg).unwrap();
    s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
    assert!(s.find_job("abcdefgh").is_none());
    assert!(s.has_event("abcdefgh", JobEventKind::Discarded));

    let mut s = State::default();
    s.push(job(r#","retry":-1"#), &now).unwrap();
    s.fetch(&["default".into()], &now, &cfg).unwrap();
    s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
    assert_eq!(s.dead_len(), 1);
}

#[test]
fn expired_reservation_counts_as_failure() {
    let cfg = cfg(Duration::from_secs(3600));
    let now = Now::get();
    let mut s = State::default();
    s.push(job(r#","reserve_for":1"#), &now).unwrap();
    s.fetch(&["default".into()], &now, &cfg).unwrap();
    let next = s.tick(&now, &cfg).unwrap();
    assert!(next > now.mono);
    assert_eq!(s.working_len(), 1);
    let now = later(&now, Duration::from_secs(1));
    s.tick(&now, &cfg);
    assert_eq!(s.working_len(), 0);
    assert_eq!(s.retries_len(), 1);
    let job = s.find_job("abcdefgh").unwrap();
    let f = job.failure.clone().unwrap();
    assert_eq!(f.errtype, "ReservationExpired");
    assert_eq!(f.message, "Faktory job reservation expired");
    assert!(!f.next_at.is_empty());
    // A late ACK is accepted but changes nothing.
    assert!(!s.ack("abcdefgh", &now));
    assert_eq!(
        s.fail("abcdefgh", None, None, None, &now, &cfg)
            .unwrap_err(),
        "Job not found abcdefgh"
    );
}

#[test]
fn fetch_checks_queues_in_order_and_scheduled_jobs_wait() {
    let cfg = cfg(Duration::ZERO);
    let now = Now::get();
    let mut s = State::default();
    let at = format_time(now.wall + chrono::Duration::seconds(5));
    s.push(job(&format!(r#","queue":"b","at":"{at}""#)), &now)
        .unwrap();
    let mut second = job(r#","queue":"a""#);
    second.jid = "12345678".into();
    s.push(second, &now).unwrap();
    assert_eq!(s.scheduled_len(), 1);
    let got = s.fetch(&["b".into(), "a".into()], &now, &cfg).unwrap();
    assert!(got.contains(r#""queue":"a""#));
    assert!(s.fetch(&["b".into(), "a".into()], &now, &cfg).is_none());
    s.tick(&later(&now, Duration::from_secs(4)), &cfg);
    assert_eq!(s.queue_size("b"), 0);
    s.tick(&later(&now, Duration::from_secs(6)), &cfg);
    assert_eq!(s.queue_size("b"), 1);
    assert!(s.has_event("abcdefgh", JobEventKind::Enqueued));
}

#[test]
fn absurd_failure_counts_from_a_producer_do_not_panic() {
    let now = Now::get();
    for (retry, count) in [(i64::MAX, i64::MAX), (i64::MAX, i64::MAX - 1), (5, -7)] {
        let cfg = Config {
            retry_delay: RetryDelay::Faktory,
            ..cfg(Duration::ZERO)
        };
        let mut s = State::default();
        let extra =
            format!(r#","retry":{retry},"failure":{{"retry_count":{count},"remaining":-3}}"#);
        s.push(job(&extra), &now).unwrap();
        s.fetch(&["default".into()], &now, &cfg).unwrap();
        s.fail("abcdefgh", None, None, None, &now, &cfg).unwrap();
        s.tick(&now, &cfg);
        assert!(s.find_job("abcdefgh").is_some());
    }
    assert!(RetryDelay::Faktory.delay(u32::MAX) >= Duration::from_secs(u64::MAX / 2));
}

#[test]
fn worker_state_only_moves_forward_and_global_is_a_floor() {
    let now = Now::get();
    let mut s = State::default();
    let hello = Hello {
        wid: "w1".into(),
        ..Hello::default()
    };
    assert!(s.beat("w1", None, &now).is_err());
    assert!(s.worker_connected(&hello, 1, now.mono));
    assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Running));
    s.set_worker_state_for("w1", WorkerState::Quiet);
    assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Quiet));
    assert_eq!(
        s.beat("w1", Some("terminate"), &now),
        Ok(WorkerState::Terminate)
    );
    s.set_worker_state_for("w1", WorkerState::Running);
    assert_eq!(
        s.beat("w1", Some("running"), &now),
        Ok(WorkerState::Terminate)
    );
    s.worker_disconnected("w1", 1);
    assert!(s.workers().is_empty());
    s.set_global_worker_state(WorkerState::Quiet);
    s.worker_connected(&hello, 2, now.mono);
    assert_eq!(s.beat("w1", None, &now), Ok(WorkerState::Quiet));
}

#[test]
fn the_first_connection_of_a_worker_holds_its_state() {
    let now = Now::get();
    let mut s = State::default();
    let hello = Hello {
        wid: "w1".into(),
        ..Hello::default()
    };
    assert!(s.worker_connected(&hello, 1, now.mono));
    assert!(!s.worker_connected(&hello, 2, now.mono));
    assert_eq!(s.workers()[0].connections, 2);
    // The first one closes: the worker stays, and a later connection does not take over.
    s.worker_disconnected("w1", 1);
    assert_eq!(s.workers()[0].connections, 1);
    assert!(!s.worker_connected(&hello, 3, now.mono));
    s.worker_disconnected("w1", 2);
    s.worker_disconnected("w1", 3);
    assert!(s.workers().is_empty());
    // Forgotten with its last connection: the next one registers it afresh.
    assert!(s.worker_connected(&hello, 4, now.mono));
}

#[test]
fn workers_silent_for_a_minute_are_reaped() {
    let start = Instant::now();
    let mut s = State::default();
    let hello = |wid: &str| Hello {
        wid: wid.into(),
        ..Hello::default()
    };
    s.worker_connected(&hello("quiet"), 1, start);
    s.worker_connected(&hello("quiet"), 2, start);
    s.worker_connected(&hello("beating"), 3, start);
    let (close, next) = s.reap_silent_workers(start, HEARTBEAT_TIMEOUT);
    assert!(close.is_empty());
    assert_eq!(next, Some(start + HEARTBEAT_TIMEOUT));
    // A BEAT just before the minute is up keeps a worker.
    let beat = Now {
        wall: Utc::now(),
        mono: start + HEARTBEAT_TIMEOUT - Duration::from_secs(1),
    };
    s.beat("beating", None, &beat).unwrap();
    let (mut close, next) = s.reap_silent_workers(start + HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT);
    close.sort_unstable();
    assert_eq!(close, [1, 2]);
    assert_eq!(next, Some(beat.mono + HEARTBEAT_TIMEOUT));
    assert_eq!(s.workers().len(), 1);
    assert_eq!(s.workers()[0].wid, "beating");
    assert_eq!(
        s.info(Duration::ZERO, 0)["faktory"]["tasks"]["Workers"]["reaped"],
        1
    );
    // The reaped worker's connections closing later changes nothing.
    s.worker_disconnected("quiet", 1);
    assert_eq!(s.workers().len(), 1);
}

#[test]
fn queue_names_are_checked_when_a_job_enters_its_queue() {
    let now = Now::get();
    let cfg = cfg(Duration::ZERO);
    let mut s = State::default();
    for name in ["bad queue", "bad/queue", "naïve", "q:x"] {
        let extra = format!(r#","queue":{name:?}"#);
        let err = s.push(job(&extra), &now).unwrap_err();
        assert_eq!(
            err,
            format!("cannot get {name:?} queue: queue names must match \\A[a-zA-Z0-9._-]+\\z")
        );
    }
    assert_eq!(s.stats().pushed, 0);
    s.push(job(r#","queue":"Ok.name_1-2""#), &now).unwrap();
    // Scheduled for later, any name is accepted; when it comes due the job is dropped.
    let later = format_time(now.wall + chrono::Duration::seconds(60));
    let mut j = job(&format!(r#","queue":"bad queue","at":"{later}""#));
    j.jid = "scheduled".into();
    s.push(j, &now).unwrap();
    assert_eq!(s.scheduled_len(), 1);
    let due = Now {
        wall: now.wall + chrono::Duration::seconds(61),
        mono: now.mono + Duration::from_secs(61),
    };
    s.tick(&due, &cfg);
    assert_eq!(s.scheduled_len(), 0);
    assert_eq!(s.queue_names(), ["Ok.name_1-2"]);
    let kinds: Vec<_> = s.history("scheduled").iter().map(JobEvent::kind).collect();
    assert_eq!(kinds, [JobEventKind::Pushed, JobEventKind::Discarded]);
}
