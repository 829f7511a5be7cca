//! How `dtb status` prints an [`Inspection`]: a table for people, JSON for machines.

use super::duration::format as age;
use crate::inspect::{Category, Inspection, RowState};
use serde_json::json;
use std::io::{self, Write};

fn state_name(state: RowState) -> &'static str {
    match state {
        RowState::Pending => "pending",
        RowState::Committed => "committed",
        RowState::Consuming => "consuming",
    }
}

/// The one-line summary of the problems, or `ok`.
fn verdict(inspection: &Inspection) -> String {
    let old = inspection.count(Category::Old);
    let unconsumed = inspection.count(Category::Unconsumed);
    let transactions = inspection
        .transactions
        .iter()
        .filter(|t| inspection.is_old(t))
        .count();
    if old + unconsumed + transactions == 0 {
        return "ok: no problems".into();
    }
    let mut parts = Vec::new();
    if old > 0 {
        parts.push(format!(
            "{old} older than {}",
            age(inspection.thresholds.older_than)
        ));
    }
    if unconsumed > 0 {
        parts.push(format!(
            "{unconsumed} committed but not consumed within {}",
            age(inspection.thresholds.grace)
        ));
    }
    if transactions > 0 {
        parts.push(format!(
            "{transactions} producer transaction(s) open longer than {}",
            age(inspection.thresholds.older_than)
        ));
    }
    format!("PROBLEMS: {} ({})", inspection.problems(), parts.join(", "))
}

/// Writes `rows` as columns separated by two spaces (the last column unpadded).
fn table(out: &mut dyn Write, rows: &[Vec<String>]) -> io::Result<()> {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == columns {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[c]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

/// The report for people.
pub(super) fn text(inspection: &Inspection, limit: usize, out: &mut dyn Write) -> io::Result<()> {
    let t = &inspection.thresholds;
    let n = inspection.barriers.len();
    write!(
        out,
        "{} barrier table {}: {n} barrier{}{}",
        inspection.backend,
        inspection.location.as_deref().unwrap_or("dtb_barriers"),
        if n == 1 { "" } else { "s" },
        if inspection.truncated {
            " (the oldest only)"
        } else {
            ""
        },
    )?;
    // Only PostgreSQL lists transactions: its uncommitted rows cannot be read.
    let open = inspection.transactions.len();
    if inspection.backend == "postgres" || open > 0 {
        write!(
            out,
            ", {open} open transaction{} writing to it",
            if open == 1 { "" } else { "s" }
        )?;
    }
    writeln!(out)?;
    let counts: Vec<String> = Category::ALL
        .iter()
        .map(|c| format!("{} {}", c.name(), inspection.count(*c)))
        .collect();
    writeln!(
        out,
        "{} (old: older than {}; unconsumed: committed, pushed more than {} ago)",
        counts.join(", "),
        age(t.older_than),
        age(t.grace)
    )?;
    if !inspection.barriers.is_empty() {
        writeln!(out)?;
        let mut rows = vec![[
            "CATEGORY", "STATE", "AGE", "PUSHED", "KIND", "QUEUE", "JID", "BARRIER", "PRODUCER",
        ]
        .map(String::from)
        .to_vec()];
        for b in inspection.barriers.iter().take(limit) {
            rows.push(vec![
                inspection.category(b).name().to_string(),
                state_name(b.state).to_string(),
                age(b.age),
                format!("{} ago", age(b.since_push)),
                b.job_kind.clone(),
                b.job_queue.clone(),
                b.job_id.clone(),
                b.id.clone(),
                match (&b.transaction, &b.txid) {
                    (Some(info), _) => info.clone(),
                    (None, Some(txid)) if b.state != RowState::Pending => {
                        format!("committed (txid {txid})")
                    }
                    (None, Some(txid)) => format!("txid {txid}"),
                    (None, None) if b.state != RowState::Pending => "committed".into(),
                    (None, None) => String::new(),
                },
            ]);
        }
        table(out, &rows)?;
        if inspection.barriers.len() > limit {
            writeln!(
                out,
                "... and {} more (--limit)",
                inspection.barriers.len() - limit
            )?;
        }
    }
    if !inspection.transactions.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "Open transactions holding a write lock on the table (producers whose barriers are \
             not committed yet, or workers between two statements):"
        )?;
        let mut rows = vec![["SESSION", "AGE", "OLD", "TRANSACTION"]
            .map(String::from)
            .to_vec()];
        for tx in &inspection.transactions {
            rows.push(vec![
                tx.session.clone(),
                tx.age.map(age).unwrap_or_else(|| "?".into()),
                if inspection.is_old(tx) { "old" } else { "" }.to_string(),
                tx.description.clone(),
            ]);
        }
        table(out, &rows)?;
    }
    writeln!(out)?;
    writeln!(out, "{}", verdict(inspection))
}

/// The report for machines: one JSON object.
pub(super) fn json(inspection: &Inspection, limit: usize, out: &mut dyn Write) -> io::Result<()> {
    let counts: serde_json::Map<String, serde_json::Value> = Category::ALL
        .iter()
        .map(|c| (c.name().to_string(), json!(inspection.count(*c))))
        .collect();
    let barriers: Vec<serde_json::Value> = inspection
        .barriers
        .iter()
        .take(limit)
        .map(|b| {
            json!({
                "id": b.id,
                "category": inspection.category(b).name(),
                "state": state_name(b.state),
                "age_secs": b.age.as_secs_f64(),
                "since_push_secs": b.since_push.as_secs_f64(),
                "job_kind": b.job_kind,
                "job_id": b.job_id,
                "job_queue": b.job_queue,
                "attempted": b.attempted,
                "txid": b.txid,
                "transaction": b.transaction,
            })
        })
        .collect();
    let transactions: Vec<serde_json::Value> = inspection
        .transactions
        .iter()
        .map(|t| {
            json!({
                "session": t.session,
                "txid": t.txid,
                "age_secs": t.age.map(|a| a.as_secs_f64()),
                "old": inspection.is_old(t),
                "description": t.description,
            })
        })
        .collect();
    let report = json!({
        "backend": inspection.backend,
        "table": inspection.location,
        "older_than_secs": inspection.thresholds.older_than.as_secs_f64(),
        "grace_secs": inspection.thresholds.grace.as_secs_f64(),
        "total": inspection.barriers.len(),
        "truncated": inspection.truncated,
        "counts": counts,
        "problems": inspection.problems(),
        "barriers": barriers,
        "open_transactions": transactions,
    });
    serde_json::to_writer_pretty(&mut *out, &report)?;
    writeln!(out)
}
