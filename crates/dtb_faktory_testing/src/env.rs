//! [`TestFaktory`]: a real Faktory named by `FAKTORY_URL`, or a [`TestServer`].

use crate::server::{TestServer, TestServerBuilder};
use rand::distributions::Alphanumeric;
use rand::Rng;
use std::fmt;
use std::io;

/// The Faktory a test talks to: the server named by the `FAKTORY_URL` environment variable
/// when it is set and not empty, otherwise a [`TestServer`] started for the test.
///
/// Tests written against it run unchanged against a real Faktory. Checks that need to look
/// inside the server go through [`server`](TestFaktory::server) (or
/// [`server_or_skip`](TestFaktory::server_or_skip)), which is `None` on a real server; and
/// jobs should go to a queue from [`unique_queue`](TestFaktory::unique_queue) so that tests
/// sharing one real server never take each other's jobs.
///
/// ```
/// use dtb_faktory_testing::TestFaktory;
///
/// let faktory = TestFaktory::from_env_or_start()?;
/// let queue = faktory.unique_queue("emails");
/// assert!(queue.starts_with("emails-"));
/// if let Some(server) = faktory.server_or_skip("queue is empty") {
///     assert_eq!(server.queue_size(&queue), 0);
/// }
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct TestFaktory {
    target: Target,
}

enum Target {
    External(String),
    Local(TestServer),
}

impl fmt::Debug for TestFaktory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            // The URL may carry a password: show only that it is external.
            Target::External(_) => f.write_str("TestFaktory::External"),
            Target::Local(server) => f.debug_tuple("TestFaktory::Local").field(server).finish(),
        }
    }
}

impl TestFaktory {
    /// Uses `FAKTORY_URL` when it is set and not empty; otherwise starts a [`TestServer`]
    /// with the default settings.
    pub fn from_env_or_start() -> io::Result<TestFaktory> {
        TestFaktory::from_env_or_start_with(TestServer::builder())
    }

    /// Uses `FAKTORY_URL` when it is set and not empty; otherwise starts a [`TestServer`]
    /// from `builder`, for tests that want the in-process server configured their own way
    /// (short retry delays or reservations, say) and a real Faktory as it is.
    ///
    /// ```
    /// use dtb_faktory_testing::{TestFaktory, TestServer};
    /// use std::time::Duration;
    ///
    /// let faktory = TestFaktory::from_env_or_start_with(
    ///     TestServer::builder().retry_delay(Duration::from_millis(100)),
    /// )?;
    /// # Ok::<(), std::io::Error>(())
    /// ```
    pub fn from_env_or_start_with(builder: TestServerBuilder) -> io::Result<TestFaktory> {
        match std::env::var("FAKTORY_URL") {
            Ok(url) if !url.trim().is_empty() => Ok(TestFaktory {
                target: Target::External(url.trim().to_string()),
            }),
            _ => Ok(TestFaktory::local(builder.start()?)),
        }
    }

    /// Wraps a server the test configured itself.
    pub fn local(server: TestServer) -> TestFaktory {
        TestFaktory {
            target: Target::Local(server),
        }
    }

    /// The URL to give to Faktory clients and workers.
    pub fn url(&self) -> String {
        match &self.target {
            Target::External(url) => url.clone(),
            Target::Local(server) => server.url(),
        }
    }

    /// The in-process server, or `None` when the tests run against a real Faktory.
    pub fn server(&self) -> Option<&TestServer> {
        match &self.target {
            Target::External(_) => None,
            Target::Local(server) => Some(server),
        }
    }

    /// Like [`server`](TestFaktory::server), but on a real Faktory prints a line saying that
    /// the check `what` is skipped, so the test output shows what was not verified.
    pub fn server_or_skip(&self, what: &str) -> Option<&TestServer> {
        let server = self.server();
        if server.is_none() {
            println!("note: FAKTORY_URL is set; skipping test-server-only check: {what}");
        }
        server
    }

    /// True when the tests run against the server named by `FAKTORY_URL`.
    pub fn is_external(&self) -> bool {
        matches!(self.target, Target::External(_))
    }

    /// A queue name no other test uses: `prefix`, a dash and 12 random alphanumerics.
    pub fn unique_queue(&self, prefix: &str) -> String {
        let suffix: String = rand::thread_rng()
            .sample_iter(&Alphanumeric)
            .take(12)
            .map(char::from)
            .collect();
        format!("{prefix}-{suffix}")
    }
}
