//! A loopback TCP proxy in front of a server, for faults a real network makes: it forwards
//! both ways until it is told to lose the server's answers, which it then reads and drops (a
//! request that reached the server whose answer never comes back).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A proxy to one server; it stops accepting when dropped (open connections end when the
/// client or the server closes them).
pub struct Proxy {
    addr: SocketAddr,
    lose_answers: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Starts a proxy to `target` (`host:port`) on a free loopback port.
    pub fn start(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().unwrap();
        let lose_answers = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (lose, stopped, target) = (
            Arc::clone(&lose_answers),
            Arc::clone(&stop),
            target.to_string(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(&target) else {
                    continue;
                };
                let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let never = Arc::new(AtomicBool::new(false));
                std::thread::spawn(move || pipe(client, server, never));
                let lose = Arc::clone(&lose);
                std::thread::spawn(move || pipe(server2, client2, lose));
            }
        });
        Proxy {
            addr,
            lose_answers,
            stop,
        }
    }

    /// The proxy's address, `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// From now on, whatever the server sends is read and dropped.
    pub fn lose_answers(&self) {
        self.lose_answers.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accepting thread so that it sees the stop.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to` until either end closes; drops what it reads while `drop` is set.
fn pipe(mut from: TcpStream, mut to: TcpStream, drop: Arc<AtomicBool>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if drop.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
