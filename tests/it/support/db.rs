//! A test's own slice of the PostgreSQL named by `AUTHGATE_TEST_DATABASE_URL`
//! (`.ci/run` sets it): a random table prefix, an admin connection, and the
//! tables dropped when the test ends, also when it fails.

pub const DB_ENV: &str = "AUTHGATE_TEST_DATABASE_URL";

/// One test's slice of the database: a random table prefix, and an admin
/// connection to inspect and cut sessions.
pub struct Db {
    pub url: String,
    pub prefix: String,
    pub admin: tokio_postgres::Client,
}

impl Db {
    /// `None` (the test skips, saying so) when the database is not configured.
    pub async fn new() -> Option<Self> {
        let Ok(url) = std::env::var(DB_ENV) else {
            println!("skipped: {DB_ENV} not set");
            return None;
        };
        let (admin, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("test database unreachable");
        tokio::spawn(connection);
        let prefix = format!("t_{:016x}", rand::random::<u64>());
        Some(Self { url, prefix, admin })
    }
}

/// Drops the test's tables even when it failed half-way: on a thread with its own
/// runtime, since `Drop` cannot await (and the test's runtime may be unwinding).
impl Drop for Db {
    fn drop(&mut self) {
        let (url, p) = (self.url.clone(), self.prefix.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(connection);
                client
                    .batch_execute(&format!(
                        "DROP TABLE IF EXISTS \"{p}_tokens\", \"{p}_schema\""
                    ))
                    .await
                    .unwrap();
            });
        });
        if cleanup.join().is_err() {
            eprintln!("could not drop the test tables of prefix {}", self.prefix);
        }
    }
}
