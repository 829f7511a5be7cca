//! Statements Diesel keeps prepared on the connection: a `sql_query` is parsed and planned by
//! the server every time it runs, which for the waiter's check costs twice what running it
//! does. A [`Prepared`] statement's text never changes, so Diesel's statement cache prepares it
//! once per connection and then only binds and runs it — unless the cache is off (as it must
//! be through PgBouncer in transaction pooling mode), where it goes unnamed, as a `sql_query`
//! would.

use diesel::pg::{Pg, PgConnection};
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::sql_types::{Array, BigInt, Nullable, Text, Untyped};
use diesel::{QueryResult, RunQueryDsl};

/// A value bound to a [`Prepared`] statement.
#[derive(Debug, Clone, Copy)]
pub(super) enum Value<'a> {
    Text(&'a str),
    Texts(&'a [String]),
    OptionalBigInts(&'a [Option<i64>]),
}

/// A statement whose text never changes, with `values` bound to its placeholders `$1`,
/// `$2`, ... (each used once, in that order).
#[derive(Debug, Clone, Copy)]
pub(super) struct Prepared<'a> {
    sql: &'a str,
    values: &'a [Value<'a>],
}

impl<'a> Prepared<'a> {
    pub(super) fn new(sql: &'a str, values: &'a [Value<'a>]) -> Prepared<'a> {
        Prepared { sql, values }
    }
}

impl QueryId for Prepared<'_> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for Prepared<'_> {
    type SqlType = Untyped;
}

impl QueryFragment<Pg> for Prepared<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Never marked unsafe to cache: the text is the same whatever the values.
        let mut rest = self.sql;
        for (n, value) in self.values.iter().enumerate() {
            let marker = format!("${}", n + 1);
            let at = placeholder(rest, &marker).ok_or_else(|| {
                diesel::result::Error::QueryBuilderError(
                    format!("placeholder {marker} missing from a prepared statement").into(),
                )
            })?;
            out.push_sql(&rest[..at]);
            match value {
                Value::Text(v) => out.push_bind_param::<Text, _>(*v)?,
                Value::Texts(v) => out.push_bind_param::<Array<Text>, _>(*v)?,
                Value::OptionalBigInts(v) => {
                    out.push_bind_param::<Array<Nullable<BigInt>>, _>(*v)?;
                }
            }
            rest = &rest[at + marker.len()..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl RunQueryDsl<PgConnection> for Prepared<'_> {}

/// Where `marker` (`$2`, say) stands in `sql` as a whole placeholder (not the start of `$20`).
fn placeholder(sql: &str, marker: &str) -> Option<usize> {
    sql.match_indices(marker).map(|(at, _)| at).find(|&at| {
        !sql[at + marker.len()..]
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_digit())
    })
}

#[cfg(test)]
mod tests {
    use super::placeholder;

    #[test]
    fn placeholders_are_whole() {
        assert_eq!(placeholder("a = $10 OR b = $1", "$1"), Some(15));
        assert_eq!(placeholder("a = $10", "$1"), None);
        assert_eq!(placeholder("$1::uuid", "$1"), Some(0));
    }
}
