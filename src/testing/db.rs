//! Databases of their own for tests: a PostgreSQL schema, a MySQL database or an SQLite file
//! per test, with the barrier table, removed when dropped.
//!
//! Barrier tests need real commits seen by other sessions, so they cannot hide inside Diesel's
//! `begin_test_transaction`; isolating each test in a database of its own lets them run in
//! parallel. The servers are named by `PG_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and `MYSQL_DATABASE_URL` (default
//! `mysql://root@127.0.0.1:3306/test`); the account must be allowed to create schemas or
//! databases.
//!
//! These helpers panic when the server cannot be reached: they are for tests.

use crate::backend::{BarrierConnection, ConnectionPool};
use diesel::r2d2::{ConnectionManager, R2D2Connection};
use std::time::Duration;

/// A database (or schema, or file) of its own for one test, dropped with everything in it
/// when the value is dropped.
pub trait TestDatabase: Sized + Send + Sync + 'static {
    /// The connection type.
    type Conn: BarrierConnection + R2D2Connection;

    /// A new, empty database with the barrier table
    /// ([`run_migrations`](crate::run_migrations) applied).
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or refuses.
    fn create() -> Self {
        let db = Self::create_unmigrated();
        crate::run_migrations(&mut db.connect()).expect("the barrier migrations run");
        db
    }

    /// A new, empty database without the barrier table.
    ///
    /// # Panics
    ///
    /// When the server cannot be reached or refuses.
    fn create_unmigrated() -> Self;

    /// A URL whose connections work inside this database.
    fn url(&self) -> String;

    /// A new connection to it.
    ///
    /// # Panics
    ///
    /// When the connection cannot be made.
    fn connect(&self) -> Self::Conn {
        <Self::Conn as diesel::Connection>::establish(&self.url())
            .unwrap_or_else(|e| panic!("connecting to the test database: {e}"))
    }

    /// A pool of at most `size` connections to it.
    ///
    /// # Panics
    ///
    /// When the pool cannot be built.
    fn pool(&self, size: u32) -> ConnectionPool<Self::Conn> {
        r2d2::Pool::builder()
            .max_size(size)
            .connection_timeout(Duration::from_secs(10))
            .build(ConnectionManager::new(self.url()))
            .unwrap_or_else(|e| panic!("a pool for the test database: {e}"))
    }
}

/// A unique, lowercase name starting with `prefix`.
#[cfg(any(feature = "postgres", feature = "mysql", feature = "sqlite"))]
fn unique_name(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::new_v4().simple())
}

/// `url` with `extra` (`key=value&...`) added to its query string.
#[cfg(feature = "postgres")]
fn with_query(url: &str, extra: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{extra}")
}

#[cfg(feature = "postgres")]
pub use self::postgres::PgTestSchema;

#[cfg(feature = "postgres")]
mod postgres {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::pg::PgConnection;
    use diesel::Connection;

    /// A PostgreSQL schema of its own (`PG_DATABASE_URL`). Its connections have it as their
    /// `search_path`, and as their `application_name`, so that a test can tell its sessions
    /// apart in `pg_stat_activity`.
    #[derive(Debug)]
    pub struct PgTestSchema {
        base: String,
        name: String,
    }

    impl PgTestSchema {
        /// The server's URL, from `PG_DATABASE_URL`.
        pub fn server_url() -> String {
            std::env::var("PG_DATABASE_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
        }

        /// The schema's name (also its sessions' `application_name`).
        pub fn name(&self) -> &str {
            &self.name
        }

        /// A connection to the server outside the schema.
        pub fn admin(&self) -> PgConnection {
            PgConnection::establish(&self.base).expect("PostgreSQL is reachable")
        }
    }

    impl TestDatabase for PgTestSchema {
        type Conn = PgConnection;

        fn create_unmigrated() -> Self {
            let schema = PgTestSchema {
                base: Self::server_url(),
                name: unique_name("dtb_test"),
            };
            schema
                .admin()
                .batch_execute(&format!("CREATE SCHEMA {}", schema.name))
                .expect("create schema");
            schema
        }

        fn url(&self) -> String {
            with_query(
                &self.base,
                &format!(
                    "options=-csearch_path%3D{0}&application_name={0}",
                    self.name
                ),
            )
        }
    }

    impl Drop for PgTestSchema {
        fn drop(&mut self) {
            if let Ok(mut admin) = PgConnection::establish(&self.base) {
                let _ = admin.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.name));
            }
        }
    }
}

#[cfg(feature = "mysql")]
pub use self::mysql::{MysqlRestrictedTestDatabase, MysqlTestDatabase};

#[cfg(feature = "mysql")]
mod mysql {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::mysql::MysqlConnection;
    use diesel::Connection;

    /// A MySQL / MariaDB database of its own (`MYSQL_DATABASE_URL`).
    #[derive(Debug)]
    pub struct MysqlTestDatabase {
        admin: String,
        name: String,
        url: String,
    }

    impl MysqlTestDatabase {
        /// The server's URL, from `MYSQL_DATABASE_URL`.
        pub fn server_url() -> String {
            std::env::var("MYSQL_DATABASE_URL")
                .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_string())
        }

        /// The database's name.
        pub fn name(&self) -> &str {
            &self.name
        }

        /// A connection to the server as the administrative account of `MYSQL_DATABASE_URL`.
        pub fn admin(&self) -> MysqlConnection {
            MysqlConnection::establish(&self.admin).expect("MySQL is reachable")
        }

        /// This database's URL with another account's credentials.
        pub fn url_as(&self, user: &str, password: &str) -> String {
            with_credentials(&self.url, user, password)
        }
    }

    impl TestDatabase for MysqlTestDatabase {
        type Conn = MysqlConnection;

        fn create_unmigrated() -> Self {
            let admin = Self::server_url();
            let name = unique_name("dtb_test");
            MysqlConnection::establish(&admin)
                .expect("MySQL is reachable")
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .expect("create database");
            let url = with_database(&admin, &name);
            MysqlTestDatabase { admin, name, url }
        }

        fn url(&self) -> String {
            self.url.clone()
        }
    }

    impl Drop for MysqlTestDatabase {
        fn drop(&mut self) {
            if let Ok(mut admin) = MysqlConnection::establish(&self.admin) {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {}", self.name));
            }
        }
    }

    /// A [`MysqlTestDatabase`] reached through an account of its own that has every privilege
    /// on that database and none beyond: no `PROCESS`, so it cannot read
    /// `information_schema.INNODB_TRX`, as an application's account often cannot. Its
    /// [`url`](TestDatabase::url), connections and pools use that account, and so does
    /// [`create`](TestDatabase::create) to run the migrations; the account is dropped with the
    /// database.
    #[derive(Debug)]
    pub struct MysqlRestrictedTestDatabase {
        database: MysqlTestDatabase,
        user: String,
        url: String,
    }

    impl MysqlRestrictedTestDatabase {
        /// The database itself: its name, and connections as the administrative account.
        pub fn database(&self) -> &MysqlTestDatabase {
            &self.database
        }

        /// The account's user name (`dtb_test_` and 12 random hexadecimal digits).
        pub fn user(&self) -> &str {
            &self.user
        }

        /// The account as `GRANT` spells it: `'user'@'%'`.
        pub fn account(&self) -> String {
            format!("'{}'@'%'", self.user)
        }
    }

    impl TestDatabase for MysqlRestrictedTestDatabase {
        type Conn = MysqlConnection;

        fn create_unmigrated() -> Self {
            let database = MysqlTestDatabase::create_unmigrated();
            // MySQL 8 allows user names of at most 32 characters.
            let random = uuid::Uuid::new_v4().simple().to_string();
            let user = format!("dtb_test_{}", &random[..12]);
            let password = uuid::Uuid::new_v4().simple().to_string();
            database
                .admin()
                .batch_execute(&format!(
                    "CREATE USER '{user}'@'%' IDENTIFIED BY '{password}'; \
                     GRANT ALL PRIVILEGES ON {}.* TO '{user}'@'%'",
                    database.name
                ))
                .expect("create user");
            let url = database.url_as(&user, &password);
            MysqlRestrictedTestDatabase {
                database,
                user,
                url,
            }
        }

        fn url(&self) -> String {
            self.url.clone()
        }
    }

    impl Drop for MysqlRestrictedTestDatabase {
        fn drop(&mut self) {
            // The database itself is dropped next, with the field.
            if let Ok(mut admin) = MysqlConnection::establish(&self.database.admin) {
                let _ = admin.batch_execute(&format!("DROP USER IF EXISTS {}", self.account()));
            }
        }
    }

    /// `url` with its database replaced by `name`.
    fn with_database(url: &str, name: &str) -> String {
        let authority = url.find("://").map_or(0, |i| i + 3);
        let (base, query) = url.split_at(url.find('?').unwrap_or(url.len()));
        let base = match base[authority..].find('/') {
            Some(slash) => &base[..authority + slash],
            None => base,
        };
        format!("{base}/{name}{query}")
    }

    /// `url` with its user and password replaced.
    fn with_credentials(url: &str, user: &str, password: &str) -> String {
        let authority = url.find("://").map_or(0, |i| i + 3);
        let end = url[authority..]
            .find('/')
            .map_or(url.len(), |i| authority + i);
        let host = match url[authority..end].rfind('@') {
            Some(at) => &url[authority + at + 1..],
            None => &url[authority..],
        };
        format!("{}{user}:{password}@{host}", &url[..authority])
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn urls_are_rewritten() {
            assert_eq!(
                with_database("mysql://root@h:3306/test?x=1", "d"),
                "mysql://root@h:3306/d?x=1"
            );
            assert_eq!(with_database("mysql://root@h", "d"), "mysql://root@h/d");
            assert_eq!(
                with_credentials("mysql://root@h:3306/d", "u", "p"),
                "mysql://u:p@h:3306/d"
            );
            assert_eq!(with_credentials("mysql://h/d", "u", "p"), "mysql://u:p@h/d");
        }
    }
}

#[cfg(feature = "sqlite")]
pub use self::sqlite::SqliteTestFile;

#[cfg(feature = "sqlite")]
mod sqlite {
    use super::*;
    use diesel::sqlite::SqliteConnection;
    use std::path::PathBuf;

    /// An SQLite database file in a temporary directory of its own, removed when dropped.
    #[derive(Debug)]
    pub struct SqliteTestFile {
        dir: PathBuf,
    }

    impl SqliteTestFile {
        /// The database file's path.
        pub fn path(&self) -> PathBuf {
            self.dir.join("test.db")
        }
    }

    impl TestDatabase for SqliteTestFile {
        type Conn = SqliteConnection;

        fn create_unmigrated() -> Self {
            let dir = std::env::temp_dir().join(unique_name("dtb-sqlite-test"));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            let file = SqliteTestFile { dir };
            // The journal mode the migrations would set, so that migrated and unmigrated
            // databases behave alike.
            diesel::connection::SimpleConnection::batch_execute(
                &mut file.connect(),
                "PRAGMA journal_mode = WAL",
            )
            .expect("WAL journal mode");
            file
        }

        fn url(&self) -> String {
            self.path().to_string_lossy().into_owned()
        }

        /// A connection as an application opens one: with a busy timeout (60 s), which
        /// every SQLite database with more than one connection needs.
        fn connect(&self) -> SqliteConnection {
            use diesel::connection::SimpleConnection;
            let mut conn = <SqliteConnection as diesel::Connection>::establish(&self.url())
                .unwrap_or_else(|e| panic!("connecting to the test database: {e}"));
            conn.batch_execute("PRAGMA busy_timeout = 60000")
                .expect("a busy timeout");
            conn
        }
    }

    impl Drop for SqliteTestFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
