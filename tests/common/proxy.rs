//! A loopback TCP proxy in front of a server, for faults a real network makes: it forwards
//! both ways until it is told to lose the server's answers, which it then reads and drops (a
//! request that reached the server whose answer never comes back), or until a chosen request
//! goes by (the server's answers to it and after it lost, or every connection cut there, as
//! when the server stops in the middle of a run of requests).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What happens once the chosen request goes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The request reaches the server; its answer, and every later one, is lost.
    LoseAnswers,
    /// The request never reaches the server: every connection is cut there, and new ones are
    /// closed at once (the server stopped).
    Cut,
}

struct Trigger {
    command: Vec<u8>,
    nth: usize,
    fault: Fault,
}

#[derive(Default)]
struct State {
    lose_answers: AtomicBool,
    dead: AtomicBool,
    stop: AtomicBool,
    trigger: Mutex<Option<Trigger>>,
    /// How many requests starting with the trigger's command went by.
    seen: AtomicUsize,
    /// Both ends of every connection, to cut them.
    streams: Mutex<Vec<TcpStream>>,
}

impl State {
    /// Counts the trigger's command in `chunk` (which follows `carry`, the end of the previous
    /// chunk); returns whether the fault strikes in this chunk.
    fn strikes(&self, carry: &[u8], chunk: &[u8]) -> Option<Fault> {
        let trigger = self.trigger.lock().unwrap();
        let trigger = trigger.as_ref()?;
        let mut text = carry.to_vec();
        text.extend_from_slice(chunk);
        let found = text
            .windows(trigger.command.len())
            .enumerate()
            .filter(|(at, w)| {
                *w == trigger.command.as_slice()
                    && (*at == 0 || text[at - 1] == b'\n')
                    // Not counted twice: a match that ends inside the carried bytes was
                    // counted with the previous chunk.
                    && at + trigger.command.len() > carry.len()
            })
            .count();
        if found == 0 {
            return None;
        }
        let seen = self.seen.fetch_add(found, Ordering::SeqCst) + found;
        (seen >= trigger.nth).then_some(trigger.fault)
    }

    fn cut(&self) {
        self.dead.store(true, Ordering::SeqCst);
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// A proxy to one server; it stops accepting when dropped (open connections end when the
/// client or the server closes them).
pub struct Proxy {
    addr: SocketAddr,
    state: Arc<State>,
}

impl Proxy {
    /// Starts a proxy to `target` (`host:port`) on a free loopback port.
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State::default());
        let (shared, target) = (Arc::clone(&state), target.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if shared.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                if shared.dead.load(Ordering::SeqCst) {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                {
                    let mut streams = shared.streams.lock().unwrap();
                    streams.push(client.try_clone().unwrap());
                    streams.push(server.try_clone().unwrap());
                }
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let s = Arc::clone(&shared);
                std::thread::spawn(move || requests(client, server, &s));
                let s = Arc::clone(&shared);
                std::thread::spawn(move || answers(server2, client2, &s));
            }
        });
        Proxy { addr, state }
    }

    /// The proxy's address, `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, whatever the server sends is read and dropped.
    pub fn lose_answers(&self) {
        self.state.lose_answers.store(true, Ordering::SeqCst);
    }

    /// Strikes with `fault` when the `nth` request (counting from 1, over every connection)
    /// that starts with `command` (`PUSHB`, say) goes by.
    pub fn fault_on(&self, command: &str, nth: usize, fault: Fault) {
        *self.state.trigger.lock().unwrap() = Some(Trigger {
            command: format!("{command} ").into_bytes(),
            nth,
            fault,
        });
    }

    /// How many requests starting with the command given to [`fault_on`](Self::fault_on) went
    /// by.
    pub fn seen(&self) -> usize {
        self.state.seen.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread so that it sees the stop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies the client's requests to the server until either end closes or the fault strikes.
fn requests(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buf = [0u8; 16 * 1024];
    let mut carry: Vec<u8> = Vec::new();
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.dead.load(Ordering::SeqCst) {
            break;
        }
        match state.strikes(&carry, &buf[..n]) {
            Some(Fault::Cut) => {
                state.cut();
                break;
            }
            Some(Fault::LoseAnswers) => state.lose_answers.store(true, Ordering::SeqCst),
            None => {}
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        let keep = n.min(16);
        carry = buf[n - keep..n].to_vec();
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Copies the server's answers to the client until either end closes; drops what it reads
/// while answers are lost.
fn answers(mut from: TcpStream, mut to: TcpStream, state: &State) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.dead.load(Ordering::SeqCst) {
            break;
        }
        if state.lose_answers.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
