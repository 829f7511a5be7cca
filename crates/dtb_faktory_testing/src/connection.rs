//! The server's threads: the listener, one thread per connection (the greeting, `HELLO` and
//! the command loop) and the clock that moves scheduled jobs, retries and expired
//! reservations at their time.

use crate::commands::dispatch;
use crate::protocol::{password_hash, printable, read_line, split_command, ReadLine, Reply};
use crate::session::{from_object, Session};
use crate::shared::Shared;
use crate::state::{Hello, Now};
use rand::Rng;
use serde::Deserialize;
use std::io::{self, BufReader, BufWriter, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

pub(crate) fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let accepted = listener.accept();
        if shared.lock().shutdown {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "test server accept failed");
                // Out of descriptors or an aborted handshake: try again shortly.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(registered) = stream.try_clone() else {
            continue;
        };
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        shared
            .conns
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, registered);
        let spawned = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name(format!("fwp-conn-{id}"))
                .spawn(move || serve_connection(&shared, stream, id))
        };
        let mut handles = shared
            .handles
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        handles.retain(|h| !h.is_finished());
        match spawned {
            Ok(handle) => handles.push(handle),
            Err(e) => {
                tracing::warn!(error = %e, "test server could not start a connection thread");
                if let Some(s) = shared
                    .conns
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id)
                {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

pub(crate) fn clock_loop(shared: Arc<Shared>) {
    let mut st = shared.lock();
    loop {
        if st.shutdown {
            return;
        }
        let before = st.generation;
        let now = Now::get();
        let next = st.tick(&now, &shared.config);
        let (silent, next_silent) =
            st.reap_silent_workers(now.mono, shared.config.heartbeat_timeout);
        if st.generation != before {
            shared.notify();
        }
        if !silent.is_empty() {
            // Their threads see the connection end and clean up after themselves.
            let conns = shared.conns.lock().unwrap_or_else(PoisonError::into_inner);
            for id in silent {
                if let Some(stream) = conns.get(&id) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
            }
        }
        let wait = [next, next_silent]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(3600));
        st = shared.wait_timeout(st, wait.max(Duration::from_micros(100)));
    }
}

fn serve_connection(shared: &Shared, stream: TcpStream, id: u64) {
    let mut session: Option<Session> = None;
    if let Err(e) = run_connection(shared, &stream, id, &mut session) {
        tracing::trace!(error = %e, "test server connection ended");
    }
    let _ = stream.shutdown(Shutdown::Both);
    shared
        .conns
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    if let Some(session) = session {
        let mut st = shared.lock();
        st.connections = st.connections.saturating_sub(1);
        if let Some(wid) = &session.wid {
            st.worker_disconnected(wid, id);
        }
        drop(st);
        shared.notify();
    }
}

/// Password challenge sent in `HI`.
struct Challenge {
    iterations: usize,
    salt: String,
}

fn run_connection(
    shared: &Shared,
    stream: &TcpStream,
    id: u64,
    session: &mut Option<Session>,
) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let mut writer = BufWriter::with_capacity(64 * 1024, stream);

    let challenge = shared.config.password.as_ref().map(|_| {
        let mut rng = rand::thread_rng();
        Challenge {
            iterations: rng.gen_range(4000..8096),
            salt: format!("{:x}", rng.gen_range(0..i64::MAX)),
        }
    });
    let hi = match &challenge {
        Some(c) => format!(r#"HI {{"v":2,"i":{},"s":"{}"}}"#, c.iterations, c.salt),
        None => r#"HI {"v":2}"#.to_string(),
    };
    Reply::Simple(hi).write_to(&mut writer)?;
    writer.flush()?;

    let max = shared.config.max_line_length;
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line, max)? {
            ReadLine::Eof => return Ok(()),
            ReadLine::TooLong => {
                Reply::err(format!("command line too long (limit is {max} bytes)"))
                    .write_to(&mut writer)?;
                writer.flush()?;
                continue;
            }
            ReadLine::Line => {}
        }
        if std::str::from_utf8(&line).is_err() {
            // The real server decodes JSON with Go, which takes invalid UTF-8 in a string as
            // U+FFFD instead of refusing it.
            line = String::from_utf8_lossy(&line).into_owned().into_bytes();
        }
        if shared.lock().shutdown {
            Reply::err("shutdown in progress").write_to(&mut writer)?;
            writer.flush()?;
            return Ok(());
        }
        let (verb, args) = split_command(&line);
        if verb == b"END" {
            return Ok(());
        }
        match session {
            None => {
                if verb != b"HELLO" {
                    Reply::err(format!(
                        "expected HELLO before {}, is the client speaking FWP?",
                        printable(verb)
                    ))
                    .write_to(&mut writer)?;
                } else {
                    match hello(shared, args.unwrap_or_default(), challenge.as_ref(), id) {
                        Ok(new_session) => {
                            Reply::Ok.write_to(&mut writer)?;
                            *session = Some(new_session);
                        }
                        Err(HelloError::Refused(msg)) => {
                            Reply::err(msg).write_to(&mut writer)?;
                            writer.flush()?;
                            return Ok(());
                        }
                        Err(HelloError::Invalid(msg)) => Reply::err(msg).write_to(&mut writer)?,
                    }
                }
            }
            Some(session) => {
                let reply = dispatch(shared, session, verb, args);
                reply.write_to(&mut writer)?;
            }
        }
        writer.flush()?;
    }
}

enum HelloError {
    /// Answer with an error and keep the connection (the client may try again).
    Invalid(String),
    /// Answer with an error and close the connection (bad password, like the real server).
    Refused(String),
}

#[derive(Deserialize)]
struct HelloIn {
    #[serde(default)]
    wid: Option<String>,
    #[serde(default)]
    hostname: Option<String>,
    #[serde(default)]
    pid: Option<i64>,
    #[serde(default)]
    labels: Option<Vec<String>>,
    #[serde(default)]
    pwdhash: Option<String>,
    #[serde(default)]
    v: Option<i64>,
}

fn hello(
    shared: &Shared,
    args: &[u8],
    challenge: Option<&Challenge>,
    conn: u64,
) -> Result<Session, HelloError> {
    let info: HelloIn =
        from_object(args).map_err(|e| HelloError::Invalid(format!("invalid HELLO: {e}")))?;
    if let (Some(password), Some(challenge)) = (&shared.config.password, challenge) {
        // The real server hashes once for clients older than protocol version 2.
        let iterations = if info.v.unwrap_or(0) < 2 {
            1
        } else {
            challenge.iterations
        };
        let expected = password_hash(password, &challenge.salt, iterations);
        if info.pwdhash.as_deref() != Some(expected.as_str()) {
            return Err(HelloError::Refused("Invalid password".into()));
        }
    }
    let wid = info.wid.filter(|w| !w.is_empty());
    let mut st = shared.lock();
    st.connections += 1;
    let holds_state = match &wid {
        Some(wid) => st.worker_connected(
            &Hello {
                wid: wid.clone(),
                hostname: info.hostname.unwrap_or_default(),
                pid: info.pid.unwrap_or_default(),
                labels: info.labels.unwrap_or_default(),
            },
            conn,
            Instant::now(),
        ),
        None => false,
    };
    drop(st);
    shared.notify();
    Ok(Session { wid, holds_state })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestServer;
    use std::io::{BufRead, Read};

    fn line(reader: &mut impl BufRead) -> String {
        let mut l = String::new();
        reader.read_line(&mut l).unwrap();
        l
    }

    #[test]
    fn a_worker_without_beat_is_reaped_and_its_connections_closed() {
        let mut builder = TestServer::builder();
        builder.config.heartbeat_timeout = Duration::from_secs(1);
        let server = builder.start().unwrap();
        let connect = |wid: &str| {
            let stream = TcpStream::connect(server.addr()).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            assert!(line(&mut reader).starts_with("+HI"));
            (&stream)
                .write_all(format!("HELLO {{\"v\":2,\"wid\":\"{wid}\"}}\r\n").as_bytes())
                .unwrap();
            assert_eq!(line(&mut reader), "+OK\r\n");
            (stream, reader)
        };
        let (beating, mut beating_reader) = connect("beating");
        let (_silent, mut silent_reader) = connect("silent");
        // The one that beats well within the timeout is kept, for longer than the timeout...
        for _ in 0..6 {
            (&beating)
                .write_all(b"BEAT {\"wid\":\"beating\"}\r\n")
                .unwrap();
            assert_eq!(line(&mut beating_reader), "+OK\r\n");
            thread::sleep(Duration::from_millis(250));
        }
        // ... and the silent one's connection was closed by the server.
        let mut rest = Vec::new();
        assert_eq!(silent_reader.read_to_end(&mut rest).unwrap(), 0);
        let workers = server.workers();
        assert_eq!(workers.len(), 1);
        assert_eq!(workers[0].wid, "beating");
        assert_eq!(
            server.shared.lock().info(Duration::ZERO, 0)["faktory"]["tasks"]["Workers"]["reaped"],
            1
        );
    }
}
