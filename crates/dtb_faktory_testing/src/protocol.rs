//! Wire-level pieces of the Faktory Work Protocol: reading command lines, writing RESP
//! replies, hashing passwords and formatting timestamps the way the real server does.

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use std::io::{self, BufRead, Write};

/// Outcome of reading one command line.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ReadLine {
    /// A full line is in the buffer, without its `\r\n` (or bare `\n`) terminator.
    Line,
    /// The line was longer than the limit; it has been consumed and discarded.
    TooLong,
    /// The peer closed the connection (a trailing partial line is dropped, as the real
    /// server does).
    Eof,
}

/// Reads one `\n`-terminated line into `buf`, never buffering more than `max` bytes of it.
///
/// A line longer than `max` is read to its end and thrown away, so the connection stays in
/// sync and the caller can answer with an error and go on.
pub(crate) fn read_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<ReadLine> {
    buf.clear();
    // Allow one extra byte for the `\r` of a `\r\n` terminator.
    let limit = max.saturating_add(1);
    let mut overflow = false;
    loop {
        let available = match reader.fill_buf() {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            buf.clear();
            return Ok(ReadLine::Eof);
        }
        let (chunk_len, found_newline) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if !overflow {
            if buf.len() + chunk_len > limit {
                overflow = true;
                buf.clear();
                buf.shrink_to(64 * 1024);
            } else {
                buf.extend_from_slice(&available[..chunk_len]);
            }
        }
        let consumed = if found_newline {
            chunk_len + 1
        } else {
            chunk_len
        };
        reader.consume(consumed);
        if found_newline {
            if overflow {
                return Ok(ReadLine::TooLong);
            }
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            if buf.len() > max {
                buf.clear();
                return Ok(ReadLine::TooLong);
            }
            return Ok(ReadLine::Line);
        }
    }
}

/// Splits a command line into its verb and what follows the first space (`None` when the
/// line has no space at all).
pub(crate) fn split_command(line: &[u8]) -> (&[u8], Option<&[u8]>) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], Some(&line[i + 1..])),
        None => (line, None),
    }
}

/// One server reply, encoded with RESP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reply {
    /// `+OK`
    Ok,
    /// `+<text>` (a simple string).
    Simple(String),
    /// `-ERR <message>`
    Error(String),
    /// `$<len>\r\n<bytes>` (a bulk string).
    Bulk(Vec<u8>),
    /// `$-1` (the null bulk string).
    Null,
}

impl Reply {
    /// An error reply with `ERR` as its code.
    pub(crate) fn err(message: impl Into<String>) -> Reply {
        Reply::Error(message.into())
    }

    /// Encodes the reply onto `out`.
    pub(crate) fn write_to<W: Write>(&self, out: &mut W) -> io::Result<()> {
        match self {
            Reply::Ok => out.write_all(b"+OK\r\n"),
            Reply::Simple(s) => {
                out.write_all(b"+")?;
                out.write_all(single_line(s).as_bytes())?;
                out.write_all(b"\r\n")
            }
            Reply::Error(msg) => {
                out.write_all(b"-ERR ")?;
                out.write_all(single_line(msg).as_bytes())?;
                out.write_all(b"\r\n")
            }
            Reply::Bulk(bytes) => {
                write!(out, "${}\r\n", bytes.len())?;
                out.write_all(bytes)?;
                out.write_all(b"\r\n")
            }
            Reply::Null => out.write_all(b"$-1\r\n"),
        }
    }

    /// The encoded bytes of the reply.
    #[cfg(test)]
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out)
            .expect("writing to a Vec never fails");
        out
    }
}

/// Makes text safe to put on one RESP line: no CR or LF, and not absurdly long.
fn single_line(s: &str) -> String {
    const MAX: usize = 1024;
    let mut out: String = s
        .chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect();
    if out.len() > MAX {
        let mut end = MAX;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push_str("...");
    }
    out
}

/// Shows client-supplied bytes in an error message: lossy UTF-8, control characters
/// escaped, cut to a short length.
pub(crate) fn printable(bytes: &[u8]) -> String {
    const MAX: usize = 64;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX * 4)]);
    let mut out = String::new();
    for (count, c) in text.chars().enumerate() {
        if count == MAX {
            out.push_str("...");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// The `pwdhash` a client sends in `HELLO`: the hex form of SHA-256 applied `iterations`
/// times, starting from `password` followed by `salt`.
///
/// This mirrors the real server, which hashes once when `iterations` is 0 or 1. It is public
/// so that tests speaking raw FWP to a password-protected server (this one or a real
/// Faktory) can authenticate.
///
/// ```
/// use dtb_faktory_testing::password_hash;
///
/// // One round is plain SHA-256 of password + salt: here SHA-256("abc").
/// assert_eq!(
///     password_hash("ab", "c", 1),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
/// );
/// assert_eq!(password_hash("pw", "salt", 4000).len(), 64);
/// ```
pub fn password_hash(password: &str, salt: &str, iterations: usize) -> String {
    let mut hasher = Sha256::new();
    hasher.update(password.as_bytes());
    hasher.update(salt.as_bytes());
    let mut hash = hasher.finalize();
    for _ in 1..iterations {
        hash = Sha256::digest(hash);
    }
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

/// Formats a time like Go's `time.RFC3339Nano` in UTC, which is what the real server
/// writes into `created_at`, `enqueued_at`, `failed_at` and friends: trailing zeros of the
/// fraction are dropped, and so is the fraction when it is zero.
pub(crate) fn format_time(t: DateTime<Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{:09}", nanos.min(999_999_999));
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// Parses an RFC 3339 timestamp (as the real server does for `at`).
pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::io::{BufReader, Cursor};

    fn lines(input: &[u8], max: usize) -> Vec<(ReadLine, Vec<u8>)> {
        // A tiny buffer makes lines straddle many `fill_buf` calls.
        let mut reader = BufReader::with_capacity(3, Cursor::new(input.to_vec()));
        let mut buf = Vec::new();
        let mut out = Vec::new();
        loop {
            let r = read_line(&mut reader, &mut buf, max).unwrap();
            let done = r == ReadLine::Eof;
            out.push((r, buf.clone()));
            if done {
                return out;
            }
        }
    }

    #[test]
    fn reads_crlf_and_lf_lines() {
        let got = lines(b"HELLO {}\r\nINFO\nEND\r\n", 100);
        assert_eq!(
            got,
            vec![
                (ReadLine::Line, b"HELLO {}".to_vec()),
                (ReadLine::Line, b"INFO".to_vec()),
                (ReadLine::Line, b"END".to_vec()),
                (ReadLine::Eof, Vec::new()),
            ]
        );
    }

    #[test]
    fn drops_a_partial_line_at_eof() {
        let got = lines(b"INFO\r\nPUSH {\"jid\"", 100);
        assert_eq!(got[0], (ReadLine::Line, b"INFO".to_vec()));
        assert_eq!(got[1], (ReadLine::Eof, Vec::new()));
        assert_eq!(got.len(), 2);
    }

    #[test]
    fn discards_an_overlong_line_and_stays_in_sync() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\r\nINFO\r\n");
        let got = lines(&input, 10);
        assert_eq!(got[0].0, ReadLine::TooLong);
        assert_eq!(got[1], (ReadLine::Line, b"INFO".to_vec()));
    }

    #[test]
    fn line_of_exactly_max_bytes_is_accepted() {
        let got = lines(b"0123456789\r\n01234567890\r\n", 10);
        assert_eq!(got[0], (ReadLine::Line, b"0123456789".to_vec()));
        assert_eq!(got[1].0, ReadLine::TooLong);
    }

    #[test]
    fn splits_verb_and_arguments() {
        assert_eq!(
            split_command(b"PUSH {\"a\": 1}"),
            (&b"PUSH"[..], Some(&b"{\"a\": 1}"[..]))
        );
        assert_eq!(split_command(b"INFO"), (&b"INFO"[..], None));
        assert_eq!(split_command(b"FETCH "), (&b"FETCH"[..], Some(&b""[..])));
        assert_eq!(
            split_command(b"FETCH a  b"),
            (&b"FETCH"[..], Some(&b"a  b"[..]))
        );
    }

    #[test]
    fn encodes_replies() {
        assert_eq!(Reply::Ok.encode(), b"+OK\r\n");
        assert_eq!(Reply::Null.encode(), b"$-1\r\n");
        assert_eq!(Reply::Bulk(b"{}".to_vec()).encode(), b"$2\r\n{}\r\n");
        assert_eq!(Reply::Bulk(Vec::new()).encode(), b"$0\r\n\r\n");
        assert_eq!(
            Reply::Simple("HI {\"v\":2}".into()).encode(),
            b"+HI {\"v\":2}\r\n"
        );
        assert_eq!(
            Reply::err("bad\r\nthing").encode(),
            b"-ERR bad  thing\r\n".to_vec()
        );
    }

    #[test]
    fn error_text_is_bounded() {
        let long = "é".repeat(5000);
        let encoded = Reply::err(long).encode();
        assert!(encoded.len() < 1100);
        assert!(encoded.ends_with(b"...\r\n"));
        assert!(std::str::from_utf8(&encoded).is_ok());
    }

    #[test]
    fn printable_escapes_control_bytes() {
        assert_eq!(printable(b"AB\x00\x1b"), "AB\\u{0}\\u{1b}");
        assert_eq!(printable(&[0xff, b'a']), "\u{fffd}a");
        assert!(printable(&[b'z'; 1000]).ends_with("..."));
    }

    #[test]
    fn password_hash_matches_the_reference_definition() {
        // Iterated by hand, independently of the implementation.
        let once = Sha256::digest(b"pwsalt");
        let twice = Sha256::digest(once);
        let thrice = Sha256::digest(twice);
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(password_hash("pw", "salt", 1), hex(&once));
        assert_eq!(password_hash("pw", "salt", 2), hex(&twice));
        assert_eq!(password_hash("pw", "salt", 3), hex(&thrice));
        assert_eq!(password_hash("pw", "salt", 0), hex(&once));
        assert_ne!(
            password_hash("pw", "salt", 3),
            password_hash("pw", "salu", 3)
        );
    }

    #[test]
    fn password_hash_known_vector() {
        // SHA-256("abc") is a published test vector.
        assert_eq!(
            password_hash("ab", "c", 1),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn formats_times_like_go_rfc3339nano() {
        let t = Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap();
        assert_eq!(format_time(t), "2024-01-02T03:04:05Z");
        let t = t + chrono::Duration::nanoseconds(120_000_000);
        assert_eq!(format_time(t), "2024-01-02T03:04:05.12Z");
        let t = t + chrono::Duration::nanoseconds(7);
        assert_eq!(format_time(t), "2024-01-02T03:04:05.120000007Z");
        assert_eq!(parse_time(&format_time(t)), Some(t));
        assert_eq!(
            parse_time("2024-01-02T04:04:05+01:00"),
            Some(Utc.with_ymd_and_hms(2024, 1, 2, 3, 4, 5).unwrap())
        );
        assert_eq!(parse_time("tomorrow"), None);
    }
}
