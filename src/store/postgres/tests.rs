//! Against a real PostgreSQL (`AUTHGATE_TEST_DATABASE_URL`); each test owns a random
//! table prefix and drops its tables at the end. URL and TLS parsing are tested
//! without a database.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::schema::SCHEMA_VERSION;
use super::url::{take_tls_params, TlsMode};
use super::*;
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;

const WAIT: Duration = Duration::from_secs(10);
const NO_POLL: Duration = Duration::from_secs(3600);

fn database_url() -> Option<String> {
    match std::env::var("AUTHGATE_TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("skipped: AUTHGATE_TEST_DATABASE_URL not set");
            None
        }
    }
}

/// One test's tables.
struct Db {
    url: String,
    prefix: String,
}

impl Db {
    fn new() -> Option<Self> {
        Some(Self {
            url: database_url()?,
            prefix: format!("agtest_{:08x}", rand::random::<u32>()),
        })
    }

    async fn store(&self) -> Arc<PostgresStore> {
        self.store_with(&self.url, None, LOCK_WAIT).await
    }

    async fn store_with(
        &self,
        url: &str,
        cipher: Option<Arc<Cipher>>,
        lock_wait: Duration,
    ) -> Arc<PostgresStore> {
        PostgresStore::start(&Secret::new(url), &self.prefix, NO_POLL, cipher, lock_wait)
            .await
            .unwrap()
    }

    /// A plain connection for the test's own SQL.
    async fn admin(&self, store: &PostgresStore) -> Client {
        store.shared.connect("test-admin").await.unwrap().0
    }
}

/// Drops the tables even when the test failed half-way: on its own thread and
/// runtime, since `Drop` cannot await.
impl Drop for Db {
    fn drop(&mut self) {
        let (url, prefix) = (self.url.clone(), self.prefix.clone());
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let store =
                    PostgresStore::start(&Secret::new(url), &prefix, NO_POLL, None, LOCK_WAIT)
                        .await
                        .unwrap();
                let (client, _) = store.shared.connect("test-cleanup").await.unwrap();
                client
                    .batch_execute(&format!(
                        "DROP TABLE IF EXISTS \"{prefix}_tokens\", \"{prefix}_schema\""
                    ))
                    .await
                    .unwrap();
            });
        });
        if cleanup.join().is_err() {
            eprintln!("could not drop the test tables of {}", self.prefix);
        }
    }
}

fn token(generation: u64, access: &str) -> StoredToken {
    StoredToken {
        access_token: Secret::new(access),
        refresh_token: Some(Secret::new(format!("refresh-{access}"))),
        token_type: "Bearer".into(),
        scope: Some("invoices.read invoices.write".into()),
        expires_at_unix: Some(1_900_000_000),
        generation,
        obtained_at_unix: 1_800_000_000,
        fingerprint: "fp-1".into(),
    }
}

fn cipher() -> Arc<Cipher> {
    Arc::new(Cipher::from_key(&Secret::new("ab".repeat(32))).unwrap())
}

/// Waits until `store` has established more than `above` LISTEN sessions.
async fn listening_above(store: &PostgresStore, above: u64) -> u64 {
    let mut rx = store.shared.listening.subscribe();
    let n = tokio::time::timeout(WAIT, rx.wait_for(|n| *n > above))
        .await
        .expect("listener (re)connected in time")
        .unwrap();
    *n
}

fn with_sslmode(url: &str, mode: &str) -> String {
    let (rest, _) = take_tls_params(url);
    let sep = if rest.contains('?') { '&' } else { '?' };
    format!("{rest}{sep}sslmode={mode}")
}

#[tokio::test]
async fn round_trip_plain_and_encrypted() {
    let Some(db) = Db::new() else { return };
    let plain = db.store().await;
    let sealed = db.store_with(&db.url, Some(cipher()), LOCK_WAIT).await;
    assert!(plain.healthy() && sealed.healthy());

    assert_eq!(plain.load("crm").await.unwrap(), None);
    let t = token(1, "plain-access");
    plain.save("crm", &t).await.unwrap();
    assert_eq!(plain.load("crm").await.unwrap(), Some(t.clone()));
    // A plaintext row stays readable once a key is configured.
    assert_eq!(sealed.load("crm").await.unwrap(), Some(t));

    let mut t = token(1, "secret-access");
    t.refresh_token = None;
    t.scope = None;
    t.expires_at_unix = None;
    sealed.save("erp", &t).await.unwrap();
    assert_eq!(sealed.load("erp").await.unwrap(), Some(t));
    let t = token(2, "secret-access");
    sealed.save("erp", &t).await.unwrap();
    assert_eq!(sealed.load("erp").await.unwrap(), Some(t));

    let admin = db.admin(&plain).await;
    let row = admin
        .query_one(
            &format!(
                "SELECT access_token, refresh_token, encrypted FROM \"{}_tokens\" WHERE provider = 'erp'",
                db.prefix
            ),
            &[],
        )
        .await
        .unwrap();
    let (access, refresh, encrypted): (String, String, bool) = (row.get(0), row.get(1), row.get(2));
    assert!(encrypted);
    assert!(Cipher::is_sealed(&access) && Cipher::is_sealed(&refresh));
    assert!(!access.contains("secret-access") && !refresh.contains("secret-access"));
    let err = plain.load("erp").await.unwrap_err();
    assert!(matches!(err, StoreError::Crypto(_)), "{err}");
}

#[tokio::test]
async fn generation_never_goes_backwards() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = db.store().await;

    a.save("crm", &token(5, "five")).await.unwrap();
    b.save("crm", &token(3, "three")).await.unwrap();
    assert_eq!(a.load("crm").await.unwrap(), Some(token(5, "five")));
    // Equal generations overwrite: degraded replicas converge on the last writer.
    b.save("crm", &token(5, "five-bis")).await.unwrap();
    assert_eq!(a.load("crm").await.unwrap(), Some(token(5, "five-bis")));
    a.save("crm", &token(6, "six")).await.unwrap();
    assert_eq!(b.load("crm").await.unwrap(), Some(token(6, "six")));
}

#[tokio::test]
async fn refresh_lock_is_exclusive_across_replicas() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = db.store().await;
    let (events, mut order) = mpsc::unbounded_channel::<&'static str>();

    let lease_a = a
        .lock_refresh("crm")
        .await
        .unwrap()
        .expect("postgres leases");
    let (acquired_tx, mut acquired) = tokio::sync::oneshot::channel();
    let b2 = b.clone();
    let events_b = events.clone();
    let waiter = tokio::spawn(async move {
        let lease = b2.lock_refresh("crm").await.unwrap().unwrap();
        events_b.send("b acquired").unwrap();
        acquired_tx.send(()).unwrap();
        lease
    });

    // Another provider's lock is independent.
    let other = tokio::time::timeout(WAIT, b.lock_refresh("erp"))
        .await
        .unwrap()
        .unwrap();
    drop(other);
    // B is still waiting while A holds the lease.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut acquired)
            .await
            .is_err(),
        "B got the lock while A held it"
    );
    events.send("a released").unwrap();
    drop(lease_a);
    tokio::time::timeout(WAIT, acquired)
        .await
        .expect("B acquires after A's lease drops")
        .unwrap();
    assert_eq!(order.recv().await, Some("a released"));
    assert_eq!(order.recv().await, Some("b acquired"));
    let lease_b = waiter.await.unwrap();

    // And back: A waits for B.
    let a2 = a.clone();
    let again = tokio::spawn(async move { a2.lock_refresh("crm").await.unwrap().unwrap() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!again.is_finished());
    drop(lease_b);
    drop(tokio::time::timeout(WAIT, again).await.unwrap().unwrap());
}

#[tokio::test]
async fn refresh_lock_wait_is_bounded() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = db
        .store_with(&db.url, None, Duration::from_millis(300))
        .await;
    let _lease = a.lock_refresh("crm").await.unwrap().unwrap();
    let started = tokio::time::Instant::now();
    let err = b.lock_refresh("crm").await.unwrap_err();
    assert!(err.to_string().contains("still held"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(b.healthy(), "a busy lock is not a failing database");
}

#[tokio::test]
async fn save_on_one_replica_notifies_the_other() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = db.store().await;
    let mut events = b.subscribe().unwrap();
    listening_above(&b, 0).await;

    a.save("crm", &token(1, "one")).await.unwrap();
    let name = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert_eq!(name.unwrap(), "crm");
    let stored = b.load("crm").await.unwrap().unwrap();
    assert_eq!(stored.generation, 1);

    // A stale save writes nothing and notifies nobody.
    a.save("crm", &token(2, "two")).await.unwrap();
    assert_eq!(
        tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap(),
        "crm"
    );
    a.save("crm", &token(1, "old")).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), events.recv())
            .await
            .is_err(),
        "no notification for a save that changed nothing"
    );
}

#[tokio::test]
async fn poll_catches_changes_without_notifications() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = PostgresStore::start(
        &Secret::new(db.url.as_str()),
        &db.prefix,
        Duration::from_millis(200),
        None,
        LOCK_WAIT,
    )
    .await
    .unwrap();
    let mut events = b.subscribe().unwrap();
    listening_above(&b, 0).await;
    // Written behind the store's back: no NOTIFY.
    db.admin(&a)
        .await
        .batch_execute(&format!(
            "INSERT INTO \"{}_tokens\" (provider, access_token, token_type, generation, \
             obtained_at_unix, fingerprint, encrypted) VALUES ('crm', 'x', 'Bearer', 7, 0, 'fp', false)",
            db.prefix
        ))
        .await
        .unwrap();
    let name = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert_eq!(name.unwrap(), "crm");
}

#[tokio::test]
async fn concurrent_start_up_migrates_once() {
    let Some(db) = Db::new() else { return };
    let (a, b, c) = tokio::join!(db.store(), db.store(), db.store());
    assert!(a.healthy() && b.healthy() && c.healthy());
    let rows = db
        .admin(&a)
        .await
        .query(
            &format!("SELECT version FROM \"{}_schema\"", db.prefix),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].get::<_, i32>(0), SCHEMA_VERSION);
    c.save("crm", &token(1, "one")).await.unwrap();
    assert_eq!(a.load("crm").await.unwrap(), Some(token(1, "one")));
    // A restart over the existing schema is a no-op.
    let d = db.store().await;
    assert!(d.healthy());
}

#[tokio::test]
async fn connections_recover_after_being_killed() {
    let Some(db) = Db::new() else { return };
    let a = db.store().await;
    let b = db.store().await;
    let admin = db.admin(&a).await;
    let sessions = listening_above(&b, 0).await;
    let kill = |role: &'static str| {
        let name = b.application_name(role);
        let admin = &admin;
        async move {
            admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .await
                .unwrap()
                .len()
        }
    };

    assert_eq!(kill("listen").await, 1);
    listening_above(&b, sessions).await;
    let mut events = b.subscribe().unwrap();
    a.save("crm", &token(1, "one")).await.unwrap();
    let name = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert_eq!(name.unwrap(), "crm");

    // The query connection reconnects on the next call, which still succeeds.
    assert_eq!(kill("query").await, 1);
    b.save("crm", &token(2, "two")).await.unwrap();
    assert_eq!(a.load("crm").await.unwrap(), Some(token(2, "two")));
    assert!(b.healthy());
}

#[tokio::test]
async fn tls_modes_follow_libpq() {
    let Some(db) = Db::new() else { return };
    let prefer = db
        .store_with(&with_sslmode(&db.url, "prefer"), None, LOCK_WAIT)
        .await;
    assert!(
        prefer.healthy(),
        "sslmode=prefer connects with or without TLS"
    );
    prefer.save("crm", &token(1, "one")).await.unwrap();
    assert_eq!(prefer.load("crm").await.unwrap(), Some(token(1, "one")));
    let on_tls: bool = prefer
        .shared
        .run("test", |c| async move {
            c.query_one(
                "SELECT coalesce((SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()), false)",
                &[],
            )
            .await
        })
        .await
        .unwrap()
        .get(0);
    eprintln!("server offers TLS: {on_tls}");

    let require = db
        .store_with(&with_sslmode(&db.url, "require"), None, LOCK_WAIT)
        .await;
    assert_eq!(
        require.healthy(),
        on_tls,
        "require works iff the server has TLS"
    );
    if on_tls {
        assert_eq!(require.load("crm").await.unwrap(), Some(token(1, "one")));
        // A local server's certificate is self-signed: not in the OS roots.
        let full = db
            .store_with(&with_sslmode(&db.url, "verify-full"), None, LOCK_WAIT)
            .await;
        assert!(
            !full.healthy(),
            "verify-full must reject an untrusted certificate"
        );
        let err = full.load("crm").await.unwrap_err();
        assert!(err.to_string().contains("TLS"), "{err}");
    }
}

#[tokio::test]
async fn unreachable_database_is_unhealthy_not_fatal() {
    // Port 1 on loopback: refused at once. Needs no database.
    let url = Secret::new("postgres://postgres:hunter2pw@127.0.0.1:1/test?sslmode=disable");
    let store = PostgresStore::start(&url, "agtest_down", NO_POLL, None, LOCK_WAIT)
        .await
        .unwrap();
    assert!(!store.healthy());
    let err = store.load("crm").await.unwrap_err();
    assert!(matches!(err, StoreError::Database(_)), "{err}");
    assert!(store.save("crm", &token(1, "one")).await.is_err());
    assert!(store.lock_refresh("crm").await.is_err());
    assert!(!store.healthy());
    let debug = format!("{store:?}");
    assert!(
        !debug.contains("hunter2pw") && !debug.contains("127.0.0.1"),
        "{debug}"
    );
    assert!(!err.to_string().contains("hunter2pw"));

    let dyn_store = open(&url, "agtest_down", NO_POLL, None).await.unwrap();
    assert_eq!(dyn_store.kind(), "postgres");
    assert!(!dyn_store.healthy());
}

#[test]
fn urls_keep_libpq_tls_semantics() {
    let parsed =
        parse_url("postgres://u:p@db.example/x?sslmode=verify-full&connect_timeout=3").unwrap();
    assert_eq!(parsed.mode, TlsMode::VerifyFull);
    assert_eq!(parsed.config.get_ssl_mode(), SslMode::Require);
    assert_eq!(
        parsed.config.get_connect_timeout(),
        Some(&Duration::from_secs(3))
    );
    assert_eq!(parse_url("postgres://db/x").unwrap().mode, TlsMode::Prefer);
    let parsed =
        parse_url("postgresql://db/x?sslrootcert=%2Fetc%2Fca.pem&sslmode=require").unwrap();
    assert_eq!(parsed.mode, TlsMode::VerifyCa);
    assert_eq!(parsed.root_cert.as_deref(), Some("/etc/ca.pem"));
    let parsed = parse_url("host=db user=u sslmode=verify-ca dbname=x").unwrap();
    assert_eq!(parsed.mode, TlsMode::VerifyCa);
    assert_eq!(
        parse_url("host=db sslmode=disable").unwrap().mode,
        TlsMode::Disable
    );
    let err = parse_url("postgres://u:secretpw@db/x?sslmode=bogus").unwrap_err();
    assert!(!err.to_string().contains("secretpw"));
    let err = parse_url("postgres://u:secretpw@db/x?nonsense=1").unwrap_err();
    assert!(!err.to_string().contains("secretpw"), "{err}");
    assert!(tls_connector(TlsMode::Require, None).unwrap().is_some());
    assert!(tls_connector(TlsMode::Disable, None).unwrap().is_none());
}

#[test]
fn table_prefix_must_be_an_identifier() {
    assert!(Names::new("authgate").is_ok());
    assert!(Names::new("Fleet_2").is_ok());
    for bad in ["", "2x", "a-b", "a;drop", "a\"b", &"x".repeat(57)] {
        assert!(Names::new(bad).is_err(), "{bad:?}");
    }
}

/// A server without TLS, simulated: a relay to the real server that answers the
/// client's SSLRequest with 'N' (as a server with `ssl = off` does).
/// While `up` is false it drops new connections at once, like a database that is down.
async fn no_tls_relay(target: (String, u16), up: Arc<AtomicBool>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !up.load(Ordering::SeqCst) {
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 8];
                inbound.read_exact(&mut first).await?;
                let ssl_request = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
                let mut outbound = tokio::net::TcpStream::connect(target).await?;
                if first == ssl_request {
                    inbound.write_all(b"N").await?;
                } else {
                    outbound.write_all(&first).await?;
                }
                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await?;
                Ok::<_, std::io::Error>(())
            });
        }
    });
    port
}

/// A key/value URL to the test database through a fresh relay.
async fn relayed_url(db: &Db, up: Arc<AtomicBool>) -> Option<String> {
    let config = parse_url(&db.url).unwrap().config;
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        #[allow(unreachable_patterns)]
        _ => {
            eprintln!("skipped: test database is not on TCP");
            return None;
        }
    };
    let target = (host, config.get_ports().first().copied().unwrap_or(5432));
    let port = no_tls_relay(target, up).await;
    let mut url = format!(
        "host=127.0.0.1 port={port} user={} dbname={}",
        config.get_user().unwrap_or("postgres"),
        config.get_dbname().unwrap_or("postgres")
    );
    if let Some(password) = config.get_password() {
        url.push_str(&format!(" password={}", String::from_utf8_lossy(password)));
    }
    Some(url)
}

#[tokio::test]
async fn prefer_falls_back_to_plaintext_when_the_server_has_no_tls() {
    let Some(db) = Db::new() else { return };
    let Some(url) = relayed_url(&db, Arc::new(AtomicBool::new(true))).await else {
        return;
    };
    let prefer = db
        .store_with(&format!("{url} sslmode=prefer"), None, LOCK_WAIT)
        .await;
    assert!(prefer.healthy(), "prefer falls back to plaintext");
    prefer.save("crm", &token(1, "one")).await.unwrap();
    assert_eq!(prefer.load("crm").await.unwrap(), Some(token(1, "one")));

    let require = db
        .store_with(&format!("{url} sslmode=require"), None, LOCK_WAIT)
        .await;
    assert!(!require.healthy(), "require never falls back");
}

#[tokio::test]
async fn health_follows_an_outage_and_recovery() {
    let Some(db) = Db::new() else { return };
    let up = Arc::new(AtomicBool::new(true));
    let Some(url) = relayed_url(&db, up.clone()).await else {
        return;
    };
    let a = db.store().await;
    let b = db
        .store_with(&format!("{url} sslmode=disable"), None, LOCK_WAIT)
        .await;
    let sessions = listening_above(&b, 0).await;
    assert!(b.healthy());

    // Outage: new connections fail and B's open sessions are cut.
    up.store(false, Ordering::SeqCst);
    db.admin(&a)
        .await
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
            &[&format!(
                "{}%",
                b.application_name("").trim_end_matches(':')
            )],
        )
        .await
        .unwrap();
    assert!(b.save("crm", &token(1, "one")).await.is_err());
    assert!(
        !b.healthy(),
        "store failing while the database is unreachable"
    );
    // Meanwhile another replica writes a token B has not seen.
    a.save("crm", &token(2, "two")).await.unwrap();

    // Recovery: the listener reconnects, catches up, and health returns.
    let mut events = b.subscribe().unwrap();
    up.store(true, Ordering::SeqCst);
    listening_above(&b, sessions).await;
    assert!(b.healthy());
    let name = tokio::time::timeout(WAIT, events.recv()).await.unwrap();
    assert_eq!(
        name.unwrap(),
        "crm",
        "the re-read after reconnect reports the change"
    );
    assert_eq!(b.load("crm").await.unwrap(), Some(token(2, "two")));
}
