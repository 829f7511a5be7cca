//! What the MySQL backend tells an operator: a producer's transaction when its barrier timed
//! out (from `information_schema`, which is a cache and needs the PROCESS privilege, so never
//! used for a verdict), and the server settings the durability argument rests on.

use super::errors::{last_errno, ER_SPECIFIC_ACCESS_DENIED};
use super::CountRow;
use diesel::mysql::MysqlConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text, Unsigned};

#[derive(QueryableByName)]
pub(super) struct SettingsRow {
    #[diesel(sql_type = Nullable<Text>)]
    flush_log_at_trx_commit: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    log_bin: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    sync_binlog: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    autocommit: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    account: Option<String>,
}

#[derive(QueryableByName)]
struct TrxRow {
    #[diesel(sql_type = Nullable<Text>)]
    trx_id: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_state: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_started: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    trx_rows_modified: Option<String>,
}

#[derive(QueryableByName)]
struct ProcessRow {
    #[diesel(sql_type = Nullable<Text>)]
    user: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    host: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    command: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    time: Option<String>,
}

/// `'user'@'host'` from `CURRENT_USER()`'s `user@host`.
fn quoted_account(current_user: &str) -> String {
    let (user, host) = current_user.rsplit_once('@').unwrap_or((current_user, "%"));
    format!(
        "'{}'@'{}'",
        user.replace('\'', "''"),
        host.replace('\'', "''")
    )
}

fn setting_warnings(settings: &SettingsRow) -> Vec<String> {
    let mut warnings = Vec::new();
    let flush = settings.flush_log_at_trx_commit.as_deref().unwrap_or("?");
    if flush != "1" {
        warnings.push(format!(
            "innodb_flush_log_at_trx_commit is {flush}, not 1: a commit is not flushed to disk \
             when it returns, so a handler may run for a transaction that a server crash then \
             erases; set innodb_flush_log_at_trx_commit = 1"
        ));
    }
    let log_bin = settings.log_bin.as_deref().unwrap_or("0");
    let sync_binlog = settings.sync_binlog.as_deref().unwrap_or("?");
    if matches!(log_bin, "1" | "ON") && sync_binlog != "1" {
        warnings.push(format!(
            "the binary log is on and sync_binlog is {sync_binlog}, not 1: after an operating \
             system crash a committed transaction whose handler already ran may be lost; set \
             sync_binlog = 1"
        ));
    }
    if settings.autocommit.as_deref() == Some("0") {
        warnings.push(
            "autocommit is off on the worker's connections: the worker's checks read outside \
             transactions and fail, or see stale data, without it; leave autocommit on"
                .to_string(),
        );
    }
    warnings
}

/// Describes the producer session `txid` (a MySQL thread id) for a timeout report.
pub(super) fn transaction_info(conn: &mut MysqlConnection, txid: Option<&str>) -> Option<String> {
    let thread = txid.and_then(|t| t.parse::<u64>().ok())?;
    let mut parts = vec![format!("MySQL thread {thread}")];
    // Diagnostics only: innodb_trx is a cache refreshed at most every 100 ms (and not at
    // all while anyone reads it more often), and it needs the PROCESS privilege.
    let trx: QueryResult<Vec<TrxRow>> = diesel::sql_query(
        "SELECT CAST(trx_id AS CHAR) AS trx_id, trx_state, \
                CAST(trx_started AS CHAR) AS trx_started, \
                CAST(trx_rows_modified AS CHAR) AS trx_rows_modified \
         FROM information_schema.INNODB_TRX WHERE trx_mysql_thread_id = ?",
    )
    .bind::<Unsigned<BigInt>, _>(thread)
    .load(conn);
    match trx {
        Ok(rows) => match rows.first() {
            Some(t) => parts.push(format!(
                "InnoDB transaction {} {} since {}, {} rows modified (innodb_trx, which may \
                 lag by 100 ms or more)",
                t.trx_id.as_deref().unwrap_or("?"),
                t.trx_state.as_deref().unwrap_or("?"),
                t.trx_started.as_deref().unwrap_or("?"),
                t.trx_rows_modified.as_deref().unwrap_or("?"),
            )),
            None => parts
                .push("no InnoDB transaction listed in innodb_trx (a cache, which may lag)".into()),
        },
        Err(e) => {
            let why = match last_errno(conn) {
                Ok(Some(ER_SPECIFIC_ACCESS_DENIED)) => "needs the PROCESS privilege".to_string(),
                _ => e.to_string(),
            };
            parts.push(format!("innodb_trx unavailable ({why})"));
        }
    }
    // Without PROCESS, PROCESSLIST still shows the threads of the worker's own user.
    let process: QueryResult<Vec<ProcessRow>> = diesel::sql_query(
        "SELECT USER AS user, HOST AS host, COMMAND AS command, CAST(TIME AS CHAR) AS time \
         FROM information_schema.PROCESSLIST WHERE ID = ?",
    )
    .bind::<Unsigned<BigInt>, _>(thread)
    .load(conn);
    match process {
        Ok(rows) => match rows.first() {
            Some(p) => parts.push(format!(
                "connection of {}@{}, command {} for {} s (KILL {thread} would roll it back)",
                p.user.as_deref().unwrap_or("?"),
                p.host.as_deref().unwrap_or("?"),
                p.command.as_deref().unwrap_or("?"),
                p.time.as_deref().unwrap_or("?"),
            )),
            None => parts.push("not in the process list (gone, or not visible)".into()),
        },
        Err(e) => parts.push(format!("process list unavailable ({e})")),
    }
    Some(parts.join("; "))
}

/// Settings and privileges an operator should hear about when a worker connects.
pub(super) fn startup_warnings(conn: &mut MysqlConnection) -> Vec<String> {
    let mut warnings = Vec::new();
    let settings: QueryResult<SettingsRow> = diesel::sql_query(
        "SELECT CAST(@@GLOBAL.innodb_flush_log_at_trx_commit AS CHAR) \
                    AS flush_log_at_trx_commit, \
                CAST(@@GLOBAL.log_bin AS CHAR) AS log_bin, \
                CAST(@@GLOBAL.sync_binlog AS CHAR) AS sync_binlog, \
                CAST(@@SESSION.autocommit AS CHAR) AS autocommit, \
                CURRENT_USER() AS account",
    )
    .get_result(conn);
    let account = match settings {
        Ok(s) => {
            warnings.extend(setting_warnings(&s));
            s.account.as_deref().map(quoted_account)
        }
        Err(e) => {
            warnings.push(format!("could not read the server's settings: {e}"));
            None
        }
    };
    // One read of innodb_trx tells whether diagnostics will be able to use it. (A single
    // read delays the cache's next refresh by at most 100 ms; it is never read again
    // except to describe a barrier that timed out.)
    let probe: QueryResult<CountRow> = diesel::sql_query(
        "SELECT COUNT(*) AS value FROM information_schema.INNODB_TRX \
         WHERE trx_mysql_thread_id = CONNECTION_ID()",
    )
    .get_result(conn);
    if let Err(e) = probe {
        let account = account.unwrap_or_else(|| "'user'@'host'".into());
        warnings.push(match last_errno(conn) {
            Ok(Some(ER_SPECIFIC_ACCESS_DENIED)) => format!(
                "the worker's database account {account} lacks the PROCESS privilege: \
                 barriers work without it, but a barrier that times out cannot be described \
                 (information_schema.innodb_trx needs it); to add it: \
                 GRANT PROCESS ON *.* TO {account}"
            ),
            _ => format!(
                "information_schema.innodb_trx cannot be read ({e}); barriers work without \
                 it, but a barrier that times out cannot be described"
            ),
        });
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_are_quoted_for_grant() {
        assert_eq!(quoted_account("app@%"), "'app'@'%'");
        assert_eq!(quoted_account("app@10.0.0.1"), "'app'@'10.0.0.1'");
        assert_eq!(quoted_account("o'neil@localhost"), "'o''neil'@'localhost'");
        assert_eq!(quoted_account("a@b@c"), "'a@b'@'c'");
    }

    #[test]
    fn settings_warnings() {
        let settings = |flush: &str, log_bin: &str, sync: &str| SettingsRow {
            flush_log_at_trx_commit: Some(flush.into()),
            log_bin: Some(log_bin.into()),
            sync_binlog: Some(sync.into()),
            autocommit: Some("1".into()),
            account: Some("root@localhost".into()),
        };
        assert!(setting_warnings(&settings("1", "0", "0")).is_empty());
        assert!(setting_warnings(&settings("1", "1", "1")).is_empty());
        let w = setting_warnings(&settings("2", "0", "0"));
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("innodb_flush_log_at_trx_commit is 2"),
            "{w:?}"
        );
        let w = setting_warnings(&settings("1", "1", "0"));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("sync_binlog is 0"), "{w:?}");
        let mut no_autocommit = settings("1", "0", "0");
        no_autocommit.autocommit = Some("0".into());
        let w = setting_warnings(&no_autocommit);
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("autocommit is off"), "{w:?}");
    }
}
