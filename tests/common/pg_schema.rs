//! A PostgreSQL schema of its own for one test (`PG_DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), dropped with everything in it at the end.
//! Its URL sets the schema as the search path and as the application name, so the test's
//! sessions can be told apart in `pg_stat_activity`.
#![cfg(feature = "postgres")]
#![allow(dead_code)]

use diesel::pg::PgConnection;
use diesel::prelude::*;

pub struct PgSchema {
    base: String,
    name: String,
}

impl PgSchema {
    /// A new, empty schema named `<prefix>_<random>`.
    pub fn create(prefix: &str) -> PgSchema {
        let base = std::env::var("PG_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        let name = format!("{prefix}_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnection::establish(&base).expect("PostgreSQL is reachable");
        diesel::sql_query(format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .expect("create schema");
        PgSchema { base, name }
    }

    /// The schema's name (also the application name of its sessions).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A URL whose connections work inside the schema.
    pub fn url(&self) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        format!(
            "{}{sep}options=-csearch_path%3D{}&application_name={}",
            self.base, self.name, self.name
        )
    }

    /// A new connection inside the schema.
    pub fn connect(&self) -> PgConnection {
        PgConnection::establish(&self.url()).expect("connect")
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Ok(mut admin) = PgConnection::establish(&self.base) {
            let _ =
                diesel::sql_query(format!("DROP SCHEMA {} CASCADE", self.name)).execute(&mut admin);
        }
    }
}
