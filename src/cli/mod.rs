//! The operator command line, `dtb` (cargo feature `cli`): what is in the barrier table, and
//! the reaper and the reconciler run once, with exit codes for cron jobs and health checks.
//!
//! ```text
//! cargo install diesel_transaction_barrier --features cli,mysql
//! dtb --database-url postgres://app@db/shop status --older-than 10m
//! dtb --database-url mysql://app@db/shop reap --older-than 30d
//! FAKTORY_URL=tcp://faktory:7419 dtb --database-url postgres://app@db/shop reconcile
//! ```
//!
//! | command | does | exit 0 | exit 1 |
//! | --- | --- | --- | --- |
//! | `status` | lists the barriers (oldest first) with their age, job kind, job id, queue and producer transaction, and the open transactions that hold barriers not committed yet; `--json` for machines | no problem | old barriers (`--older-than`, default 1h), committed ones no worker took within `--grace` (default 15m), or producer transactions open longer than `--older-than` |
//! | `reap` | deletes barriers older than `--older-than` (default 30d), as a worker's reaper does ([`reap_barriers`](crate::reap_barriers)) | it ran | |
//! | `reconcile` | pushes again the jobs of committed barriers not consumed within `--grace` (default 15m) and younger than `--max-age` (default 30d) ([`reconcile_barriers`](crate::reconcile_barriers)); Faktory from `--faktory-url`, else `FAKTORY_URL` | it ran | |
//!
//! Exit code 2 means the command could not run: bad arguments, a database or Faktory that
//! cannot be reached, a backend this build lacks, or a database without the barrier table. The
//! database comes from `--database-url` or `DATABASE_URL`: `postgres://` (feature `postgres`),
//! `mysql://` (feature `mysql`), or an SQLite file path or `sqlite://` URL (feature `sqlite`).
//! Errors go to standard error, reports to standard output.
//!
//! The binary is `src/bin/dtb.rs`, a call to [`main`]; [`run`] is the same with the arguments,
//! output and error streams given, for tests.

mod duration;
mod output;

use crate::backend::BarrierConnection;
use crate::error::chain;
use crate::inspect::Thresholds;
use crate::producer::Producer;
use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::time::Duration;

/// Exit code: the command ran and found nothing wrong.
pub const EXIT_OK: u8 = 0;
/// Exit code: `status` found problems (old or unconsumed barriers, long-open producer
/// transactions).
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code: the command could not run (arguments, connection, missing backend or table).
pub const EXIT_FAILED: u8 = 2;

/// How many barrier rows `status` reads at most (the oldest).
const READ_LIMIT: usize = 100_000;

#[derive(Parser, Debug)]
#[command(
    name = "dtb",
    version,
    about = "Inspect and maintain diesel_transaction_barrier's barrier table",
    after_help = "Exit codes: 0 ok, 1 problems found (status), 2 could not run."
)]
struct Cli {
    /// The database: postgres://..., mysql://..., or an SQLite file path or sqlite://PATH.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the barriers and the open producer transactions; exit 1 if any is a problem.
    Status(StatusArgs),
    /// Delete barriers older than --older-than, as a worker's reaper does.
    Reap(ReapArgs),
    /// Push again the jobs of committed barriers that no worker consumed within --grace.
    Reconcile(ReconcileArgs),
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Barriers and producer transactions older than this are problems.
    #[arg(long, default_value = "1h", value_parser = duration_arg)]
    older_than: Duration,
    /// Committed barriers whose job was pushed longer ago than this, never attempted, are
    /// problems (the worker's reconcile grace).
    #[arg(long, default_value = "15m", value_parser = duration_arg)]
    grace: Duration,
    /// List at most this many barriers (the oldest); the counts cover all of them.
    #[arg(long, default_value_t = 50)]
    limit: usize,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct ReapArgs {
    /// Delete barriers created longer ago than this (must exceed the longest time a committed
    /// job may still be retried).
    #[arg(long, default_value = "30d", value_parser = duration_arg)]
    older_than: Duration,
}

#[derive(Args, Debug)]
struct ReconcileArgs {
    /// Push again jobs last pushed longer ago than this.
    #[arg(long, default_value = "15m", value_parser = duration_arg)]
    grace: Duration,
    /// Leave barriers older than this to the reaper.
    #[arg(long, default_value = "30d", value_parser = duration_arg)]
    max_age: Duration,
    /// The Faktory server, tcp://[:password@]host:port.
    #[arg(long, env = "FAKTORY_URL", hide_env_values = true)]
    faktory_url: Option<String>,
}

fn duration_arg(text: &str) -> Result<Duration, String> {
    duration::parse(text)
}

/// Why a command could not run: said on standard error, exit code 2.
struct Failure(String);

impl<E: std::error::Error> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(chain(&e).to_string())
    }
}

/// Runs `dtb` with the process's arguments and streams, and returns its exit code.
pub fn main() -> std::process::ExitCode {
    let code = run(
        std::env::args_os(),
        &mut std::io::stdout().lock(),
        &mut std::io::stderr().lock(),
    );
    std::process::ExitCode::from(code)
}

/// Runs `dtb` with `args` (the first is the program's name), writing its report to `out` and
/// its errors to `err`; returns the exit code ([`EXIT_OK`], [`EXIT_PROBLEMS`],
/// [`EXIT_FAILED`]).
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors.
            let text = e.render().to_string();
            let code = e.exit_code();
            let _ = if code == 0 {
                out.write_all(text.as_bytes())
            } else {
                err.write_all(text.as_bytes())
            };
            return if code == 0 { EXIT_OK } else { EXIT_FAILED };
        }
    };
    match dispatch(&cli, out) {
        Ok(code) => code,
        Err(Failure(message)) => {
            let _ = writeln!(err, "dtb: {message}");
            EXIT_FAILED
        }
    }
}

/// Picks the backend from the URL's scheme.
fn dispatch(cli: &Cli, out: &mut dyn Write) -> Result<u8, Failure> {
    let url = cli.database_url.as_deref().ok_or_else(|| {
        Failure("no database: give --database-url or set DATABASE_URL".to_string())
    })?;
    let scheme = url.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("postgres" | "postgresql") => postgres(url, &cli.command, out),
        Some("mysql") => mysql(url, &cli.command, out),
        Some("sqlite") | Some("file") | None => sqlite(
            url.strip_prefix("sqlite://").unwrap_or(url),
            &cli.command,
            out,
        ),
        Some(other) => Err(Failure(format!(
            "unknown database URL scheme {other:?}: postgres://, mysql://, or an SQLite path"
        ))),
    }
}

#[cfg(feature = "postgres")]
fn postgres(url: &str, command: &Command, out: &mut dyn Write) -> Result<u8, Failure> {
    run_on::<diesel::pg::PgConnection>(url, command, out)
}

#[cfg(feature = "mysql")]
fn mysql(url: &str, command: &Command, out: &mut dyn Write) -> Result<u8, Failure> {
    run_on::<diesel::mysql::MysqlConnection>(url, command, out)
}

#[cfg(feature = "sqlite")]
fn sqlite(path: &str, command: &Command, out: &mut dyn Write) -> Result<u8, Failure> {
    // Opening a file that is not there would create an empty database.
    if !path.starts_with("file:") && !std::path::Path::new(path).is_file() {
        return Err(Failure(format!("no SQLite database file at {path:?}")));
    }
    run_on::<diesel::sqlite::SqliteConnection>(path, command, out)
}

#[cfg(not(feature = "postgres"))]
fn postgres(_: &str, _: &Command, _: &mut dyn Write) -> Result<u8, Failure> {
    Err(missing_backend("postgres"))
}

#[cfg(not(feature = "mysql"))]
fn mysql(_: &str, _: &Command, _: &mut dyn Write) -> Result<u8, Failure> {
    Err(missing_backend("mysql"))
}

#[cfg(not(feature = "sqlite"))]
fn sqlite(_: &str, _: &Command, _: &mut dyn Write) -> Result<u8, Failure> {
    Err(missing_backend("sqlite"))
}

#[allow(dead_code)] // unused when every backend is built
fn missing_backend(name: &str) -> Failure {
    Failure(format!(
        "this dtb was built without the {name} backend: install it with \
         `cargo install diesel_transaction_barrier --features cli,{name}`"
    ))
}

#[allow(dead_code)] // unused when no backend is built
fn run_on<C: BarrierConnection>(
    url: &str,
    command: &Command,
    out: &mut dyn Write,
) -> Result<u8, Failure> {
    let mut conn = C::establish(url)
        .map_err(|e| Failure(format!("cannot connect to the database: {}", chain(&e))))?;
    crate::migrations::require_barrier_schema(&mut conn).map_err(|e| Failure(e.to_string()))?;
    match command {
        Command::Status(args) => {
            let thresholds = Thresholds {
                older_than: args.older_than,
                grace: args.grace,
            };
            let inspection = crate::maintenance::inspect::read(&mut conn, thresholds, READ_LIMIT)?;
            if args.json {
                output::json(&inspection, args.limit, out)?;
            } else {
                output::text(&inspection, args.limit, out)?;
            }
            Ok(if inspection.problems() > 0 {
                EXIT_PROBLEMS
            } else {
                EXIT_OK
            })
        }
        Command::Reap(args) => {
            let reaped = crate::reap_barriers(&mut conn, args.older_than)?;
            writeln!(
                out,
                "reaped {reaped} barrier{} older than {}",
                plural(reaped),
                duration::format(args.older_than)
            )?;
            Ok(EXIT_OK)
        }
        Command::Reconcile(args) => {
            let mut builder = Producer::builder();
            if let Some(url) = &args.faktory_url {
                builder = builder.url(url.clone());
            }
            let producer = builder
                .connect()
                .map_err(|e| Failure(format!("cannot reach Faktory: {}", chain(&e))))?;
            let pushed = crate::reconcile_barriers(&mut conn, &producer, args.grace, args.max_age)?;
            writeln!(
                out,
                "pushed {pushed} job{} again (committed, not consumed within {})",
                plural(pushed),
                duration::format(args.grace)
            )?;
            Ok(EXIT_OK)
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> (u8, String, String) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let code = run(
            std::iter::once("dtb").chain(args.iter().copied()),
            &mut out,
            &mut err,
        );
        (
            code,
            String::from_utf8(out).unwrap(),
            String::from_utf8(err).unwrap(),
        )
    }

    #[test]
    fn bad_arguments_exit_2() {
        let (code, _, err) = run_args(&["status", "--older-than", "ten minutes"]);
        assert_eq!(code, EXIT_FAILED);
        assert!(err.contains("--older-than"), "{err}");
        let (code, _, err) = run_args(&["frobnicate"]);
        assert_eq!(code, EXIT_FAILED, "{err}");
        let (code, _, err) = run_args(&["--database-url", "oracle://x/y", "status"]);
        assert_eq!(code, EXIT_FAILED);
        assert!(err.contains("unknown database URL scheme"), "{err}");
    }

    #[test]
    fn help_exits_0_on_standard_output() {
        let (code, out, err) = run_args(&["--help"]);
        assert_eq!(code, EXIT_OK);
        assert!(
            out.contains("status") && out.contains("Exit codes"),
            "{out}"
        );
        assert!(err.is_empty());
    }
}
