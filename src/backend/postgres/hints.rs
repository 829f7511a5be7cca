//! PostgreSQL's commit hints: the producer's insert `NOTIFY`s the barrier id on
//! [`CHANNEL`], delivered only once its transaction commits; the waiter's listening connection
//! reads the notifications from its socket buffer, without a query.

use super::{BoolRow, TextRow};
use crate::backend::{Hint, Listen};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::Text;
use std::time::Duration;

/// The `NOTIFY` channel of commit hints.
pub(super) const CHANNEL: &str = "dtb_barriers";
/// What prefixes a transaction id in a hint's payload (a producer's insert names its
/// transaction; a payload that is a UUID names a barrier).
pub(super) const TRANSACTION_HINT: &str = "x";

/// PostgreSQL's [`Listen`] capability.
pub(super) struct Notifications;

/// The one instance the backend hands out.
pub(super) static NOTIFICATIONS: Notifications = Notifications;

impl Listen<PgConnection> for Notifications {
    fn poll_interval(&self) -> Duration {
        // A read of the socket buffer, not a round trip.
        Duration::from_micros(500)
    }

    fn listen(&self, conn: &mut PgConnection) -> QueryResult<()> {
        diesel::sql_query(format!("LISTEN {CHANNEL}")).execute(conn)?;
        Ok(())
    }

    fn unlisten(&self, conn: &mut PgConnection) -> QueryResult<()> {
        diesel::sql_query(format!("UNLISTEN {CHANNEL}")).execute(conn)?;
        Ok(())
    }

    fn shares_sessions(
        &self,
        conn: &mut PgConnection,
        other: &mut PgConnection,
    ) -> QueryResult<bool> {
        // A session-level setting with a random value: no other session can see it, unless a
        // pooler lends this server session to the other client too (PgBouncer lends the one it
        // got back last first). The setting stays with the session: a custom one, of no use to
        // anyone.
        let token = uuid::Uuid::new_v4().simple().to_string();
        diesel::sql_query("SELECT set_config('dtb.session_probe', $1, false) AS value")
            .bind::<Text, _>(&token)
            .get_result::<TextRow>(conn)?;
        let seen: BoolRow = diesel::sql_query(
            "SELECT coalesce(current_setting('dtb.session_probe', true) = $1, false) AS value",
        )
        .bind::<Text, _>(&token)
        .get_result(other)?;
        Ok(seen.value)
    }

    fn send_test_hint(&self, conn: &mut PgConnection, id: &uuid::Uuid) -> QueryResult<bool> {
        // A notification like a producer's, for a barrier nobody waits for: every listener
        // of the database hears it and drops it; the waiter that sent it learns that its
        // listener hears hints.
        diesel::sql_query("SELECT pg_notify($1, $2)")
            .bind::<Text, _>(CHANNEL)
            .bind::<Text, _>(id.hyphenated().to_string())
            .execute(conn)?;
        Ok(true)
    }

    fn take(&self, conn: &mut PgConnection) -> QueryResult<Vec<Hint>> {
        // Reads what the server already sent to this idle connection: no query, no round trip.
        // Anything else on the channel is dropped: anyone may notify it.
        let mut hints = Vec::new();
        for n in conn.notifications_iter() {
            let n = n?;
            if n.channel != CHANNEL {
                continue;
            }
            if let Ok(id) = uuid::Uuid::try_parse(&n.payload) {
                hints.push(Hint::Barrier(id));
            } else if let Some(txid) = n.payload.strip_prefix(TRANSACTION_HINT) {
                if !txid.is_empty() && txid.len() <= 20 && txid.bytes().all(|b| b.is_ascii_digit())
                {
                    hints.push(Hint::Transaction(txid.to_string()));
                }
            }
        }
        Ok(hints)
    }
}
