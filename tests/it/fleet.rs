//! Fleet mode: several gateways share one token through PostgreSQL.
//! Runs against the server named by `AUTHGATE_TEST_DATABASE_URL` (`.ci/run` sets
//! it); each test works in its own table prefix and drops its tables at the end.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::StatusCode;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use authgate::token::Trigger;

use crate::support::until;
use crate::support::{Client, MockIdp, MockUpstream, TestGateway};

use crate::support::db::{Db, DB_ENV};

impl Db {
    /// A gateway config for this test. `url_env` names the variable holding the
    /// database URL (each replica may get its own, to tell its sessions apart).
    fn config(&self, idp: &MockIdp, up: &MockUpstream, url_env: &str) -> String {
        format!(
            r#"
[providers.crm]
grant = "client_credentials"
token_url = "{token_url}"
client_id = "fleet"
client_secret_env = "FLEET_CLIENT_SECRET"
min_refresh_interval = "10ms"

[[routes]]
prefix = "/crm"
upstream = "{upstream}"
provider = "crm"

[store]
kind = "postgres"
url_env = "{url_env}"
table_prefix = "{prefix}"
poll_interval = "500ms"
"#,
            token_url = idp.token_url(),
            upstream = up.url(),
            prefix = self.prefix,
        )
    }

    /// A fleet config whose provider uses rotating refresh tokens (the mock IdP's
    /// `rt-0` seeds the first). `min_refresh_interval = "0s"`: how soon after its
    /// start-up a replica may refresh on a 401 is not what these tests check.
    fn rotating_config(&self, idp: &MockIdp, up: &MockUpstream, url_env: &str) -> String {
        self.config(idp, up, url_env)
            .replace(
                r#"grant = "client_credentials""#,
                "grant = \"refresh_token\"\nrefresh_token_env = \"FLEET_REFRESH_TOKEN\"",
            )
            .replace(
                r#"min_refresh_interval = "10ms""#,
                r#"min_refresh_interval = "0s""#,
            )
    }

    /// Takes the fleet's refresh lock for `crm` on a session of the test's own,
    /// as a replica refreshing at the IdP would hold it; dropping the returned
    /// client ends the session and releases it.
    async fn hold_refresh_lock(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .execute(
                "SELECT pg_advisory_lock(hashtext($1))",
                &[&format!("{}:crm", self.prefix)],
            )
            .await
            .unwrap();
        client
    }

    /// Announces a change of `crm`'s row, as a replica's save does.
    async fn notify(&self) {
        self.admin
            .execute(
                "SELECT pg_notify($1, 'crm')",
                &[&format!("{}_tokens", self.prefix)],
            )
            .await
            .unwrap();
    }

    /// The stored generation of `crm`, if a row exists.
    async fn stored_generation(&self) -> Option<i64> {
        let sql = format!(
            "SELECT generation FROM \"{}_tokens\" WHERE provider = 'crm'",
            self.prefix
        );
        // The table appears with the first replica's migration.
        match self.admin.query_opt(sql.as_str(), &[]).await {
            Ok(row) => row.map(|r| r.get(0)),
            Err(_) => None,
        }
    }

    async fn stored_token(&self) -> Option<String> {
        let sql = format!(
            "SELECT access_token FROM \"{}_tokens\" WHERE provider = 'crm'",
            self.prefix
        );
        self.admin
            .query_opt(sql.as_str(), &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0))
    }

    /// Ends every session whose `application_name` starts with `base`.
    async fn terminate(&self, base: &str) -> usize {
        self.admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name LIKE $1",
                &[&format!("{base}:%")],
            )
            .await
            .unwrap()
            .len()
    }
}

fn setup_env() {
    std::env::set_var("FLEET_CLIENT_SECRET", "fleet-secret");
    std::env::set_var("FLEET_REFRESH_TOKEN", "rt-0");
}

fn generation(gw: &TestGateway) -> Option<u64> {
    gw.provider("crm").current().map(|t| t.generation)
}

fn token_of(gw: &TestGateway) -> Option<String> {
    gw.provider("crm")
        .current()
        .map(|t| t.access_token.expose().to_owned())
}

/// Starts a replica once the previous one's token is in the store, so start-up
/// order is deterministic: each later replica adopts instead of fetching.
async fn start_after_row(db: &Db, toml: &str, generation: u64) -> TestGateway {
    until("the token row", || async {
        db.stored_generation().await == Some(generation as i64)
    })
    .await;
    let gw = TestGateway::start(toml).await;
    gw.ready().await;
    gw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_refresh_once_fleet_wide_after_revocation() {
    let Some(db) = Db::new().await else { return };
    setup_env();
    let idp = MockIdp::start().await;
    // An IdP that revokes the previous token whenever it issues one: two replicas
    // refreshing on their own would knock each other's tokens out.
    *idp.state.revoke_on_issue.lock().unwrap() = true;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = db.config(&idp, &up, DB_ENV);

    let a = TestGateway::start(&toml).await;
    a.ready().await;
    let g = generation(&a).unwrap();
    let b = start_after_row(&db, &toml, g).await;
    let c = start_after_row(&db, &toml, g).await;
    assert_eq!(idp.requests(), 1, "one start-up token for the whole fleet");
    let replicas = [&a, &b, &c];
    for gw in replicas {
        assert_eq!(generation(gw), Some(g));
    }

    let before = idp.requests();
    idp.revoke_all();
    let client = Client::new();
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..1000 {
        let url = replicas[i % 3].url(&format!("/crm/item/{i}"));
        let client = client.clone();
        tasks.spawn(async move {
            let r = client.get(&url).await;
            (r.status, r.text())
        });
    }
    let mut failed = Vec::new();
    while let Some(reply) = tasks.join_next().await {
        let (status, body) = reply.unwrap();
        if status != StatusCode::OK {
            failed.push(format!("{status} {body}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of 1000 failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    assert_eq!(
        idp.requests() - before,
        1,
        "exactly one token request across the fleet"
    );
    let g2 = generation(&a).unwrap();
    assert!(g2 > g);
    for gw in replicas {
        assert_eq!(generation(gw), Some(g2));
        assert_eq!(token_of(gw), token_of(&a));
    }
    assert_eq!(db.stored_generation().await, Some(g2 as i64));
    println!(
        "fleet: 1000 requests over 3 replicas in {:?}, {} upstream 401s, {} token request(s)",
        started.elapsed(),
        up.unauthorized(),
        idp.requests() - before
    );

    for gw in [a, b, c] {
        gw.stop().await;
    }
}

#[tokio::test]
async fn late_replica_adopts_the_stored_token_without_asking_the_idp() {
    let Some(db) = Db::new().await else { return };
    setup_env();
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = db.config(&idp, &up, DB_ENV);

    let a = TestGateway::start(&toml).await;
    a.ready().await;
    let g = generation(&a).unwrap();
    let before = idp.requests();
    let late = start_after_row(&db, &toml, g).await;
    assert_eq!(idp.requests(), before, "the late replica asked the IdP");
    assert_eq!(generation(&late), Some(g));
    assert_eq!(token_of(&late), token_of(&a));
    let r = Client::new().get(&late.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(idp.requests(), before);

    late.stop().await;
    a.stop().await;
}

impl Db {
    /// A relay in front of the test's PostgreSQL, and the name of an environment
    /// variable holding a database URL through it whose sessions carry
    /// `application_name` (so the test can find and end them).
    async fn relayed(&self, app_name: &str) -> (Arc<Relay>, String) {
        let pg = tokio_postgres::Config::from_str(&self.url).unwrap();
        let host = match &pg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            #[allow(unreachable_patterns)]
            _ => panic!("{DB_ENV} must name a TCP host"),
        };
        let port = pg.get_ports().first().copied().unwrap_or(5432);
        let target = tokio::net::lookup_host((host.as_str(), port))
            .await
            .unwrap()
            .next()
            .unwrap();
        let relay = Relay::start(target).await;
        let mut url = self
            .url
            .replacen(&format!("{host}:{port}"), &relay.addr.to_string(), 1);
        assert_ne!(url, self.url, "{DB_ENV} should spell host:port");
        url.push(if url.contains('?') { '&' } else { '?' });
        url.push_str(&format!("application_name={app_name}"));
        let env = format!("FLEET_URL_{}", app_name.to_uppercase());
        std::env::set_var(&env, &url);
        (relay, env)
    }
}

/// A TCP relay in front of PostgreSQL that the test can cut: while down, it closes
/// every relayed connection and refuses new ones, like a network partition.
struct Relay {
    addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: std::sync::Mutex<CancellationToken>,
}

impl Relay {
    async fn start(target: SocketAddr) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let relay = Arc::new(Relay {
            addr: listener.local_addr().unwrap(),
            up: Arc::new(AtomicBool::new(true)),
            cut: std::sync::Mutex::new(CancellationToken::new()),
        });
        let r = relay.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !r.up.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close
                }
                let cut = r.cut.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        relay
    }

    fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let mut cut = self.cut.lock().unwrap();
        cut.cancel();
        *cut = CancellationToken::new();
    }

    fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_cut_from_the_database_keeps_serving_and_converges() {
    let Some(db) = Db::new().await else { return };
    setup_env();
    let idp = MockIdp::start().await;
    let up = MockUpstream::with_idp(&idp).await;

    // Replica C reaches PostgreSQL through a relay, under its own application_name.
    let app_name = format!("fleet_{}_c", db.prefix);
    let (relay, c_env) = db.relayed(&app_name).await;

    let a = TestGateway::start(&db.config(&idp, &up, DB_ENV)).await;
    a.ready().await;
    let g = generation(&a).unwrap();
    let c = start_after_row(&db, &db.config(&idp, &up, &c_env), g).await;
    assert_eq!(generation(&c), Some(g));
    let c_store = c.app().gateway.store.clone();
    until("C's store healthy", || async { !c_store.is_failing() }).await;

    // Cut: the relay drops C's connections, and the server ends C's sessions.
    relay.down();
    db.terminate(&app_name).await;
    until("C reports its store failing", || async {
        c_store.is_failing()
    })
    .await;
    let client = Client::new();
    assert_eq!(client.get(&c.url("/crm/a")).await.status, StatusCode::OK);

    // Meanwhile A refreshes through the fleet (stored, generation g+1), and C,
    // unable to take the fleet lock, refreshes locally (degraded) to the same
    // generation with another token.
    let timeout = Duration::from_secs(10);
    let ta = a
        .provider("crm")
        .refresh_now(Trigger::Manual, timeout)
        .await
        .unwrap();
    assert_eq!(ta.generation, g + 1);
    let tc = c
        .provider("crm")
        .refresh_now(Trigger::Manual, timeout)
        .await
        .unwrap();
    assert_eq!(tc.generation, g + 1);
    assert_ne!(tc.access_token, ta.access_token);
    assert!(c_store.is_failing());
    assert_eq!(client.get(&c.url("/crm/b")).await.status, StatusCode::OK);
    let requests = idp.requests();

    // The database returns: C converges on the stored row (same generation,
    // the row wins) without asking the IdP.
    relay.up();
    until("C converged on the fleet token", || async {
        token_of(&c) == token_of(&a) && generation(&c) == generation(&a)
    })
    .await;
    until("C's store healthy again", || async {
        !c_store.is_failing()
    })
    .await;
    assert_eq!(db.stored_token().await, token_of(&a));
    assert_eq!(idp.requests(), requests);
    assert_eq!(client.get(&c.url("/crm/c")).await.status, StatusCode::OK);

    // And a later refresh on A reaches C by notification.
    let t3 = a
        .provider("crm")
        .refresh_now(Trigger::Manual, timeout)
        .await
        .unwrap();
    assert_eq!(t3.generation, g + 2);
    until("C caught up with A's refresh", || async {
        generation(&c) == Some(g + 2)
    })
    .await;
    assert_eq!(token_of(&c), token_of(&a));

    c.stop().await;
    a.stop().await;
}

/// Starts a replica while the test holds the fleet lock: its start-up refresh
/// waits for the lease, and meanwhile a notification hands it the fleet's token
/// (generation `g`). Dropping the returned client lets the start-up refresh end.
async fn start_fed_by_notification(
    db: &Db,
    toml: &str,
    g: u64,
) -> (TestGateway, tokio_postgres::Client) {
    let lock = db.hold_refresh_lock().await;
    let c = TestGateway::start(toml).await;
    until(
        "the replica holds the fleet token by notification",
        || async {
            db.notify().await;
            generation(&c) == Some(g)
        },
    )
    .await;
    assert!(
        c.provider("crm").status().refreshing,
        "its start-up refresh waits for the lease"
    );
    (c, lock)
}

/// A 401 for the current generation that arrives while a refresh asked for with an
/// older one is in flight (here the start-up fetch of a replica that got the fleet's
/// token by notification meanwhile) cannot take that refresh's result, which may be
/// the rejected generation: it waits for it, then gets a refresh of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_during_an_older_refresh_gets_a_refresh_of_its_own() {
    let Some(db) = Db::new().await else { return };
    setup_env();
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = db.rotating_config(&idp, &up, DB_ENV);

    let a = TestGateway::start(&toml).await;
    a.ready().await;
    let g = generation(&a).unwrap();
    let (c, lock) = start_fed_by_notification(&db, &toml, g).await;
    idp.revoke_all();
    let request = tokio::spawn({
        let url = c.url("/crm/x");
        async move { Client::new().get(&url).await }
    });
    until("the 401 waits on the start-up refresh", || async {
        up.unauthorized() == 1
    })
    .await;
    drop(lock);
    let r = request.await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(idp.requests(), 2, "the start-up token and one refresh");
    assert!(generation(&c).unwrap() > g);
    assert_eq!(idp.refresh_token_reuses(), 0);

    for gw in [a, c] {
        gw.stop().await;
    }
}

/// A replica whose tokens only ever came by notification (its start-up refresh
/// found the fleet's token in its cell after waiting for the fleet lock) must, on
/// a 401 for the current generation, refresh at the IdP and replay: taking the
/// stored row of the rejected generation back as the "new" token would hand the
/// caller the 401.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_fed_only_by_notifications_refreshes_after_a_401() {
    let Some(db) = Db::new().await else { return };
    setup_env();
    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let toml = db.rotating_config(&idp, &up, DB_ENV);
    let client = Client::new();

    let a = TestGateway::start(&toml).await;
    a.ready().await;
    let g = generation(&a).unwrap();
    let b = start_after_row(&db, &toml, g).await;

    let (c, lock) = start_fed_by_notification(&db, &toml, g).await;
    drop(lock);
    until("C's start-up refresh ended", || async {
        !c.provider("crm").status().refreshing
    })
    .await;
    assert_eq!(
        idp.requests(),
        1,
        "one token request for the whole fleet so far"
    );

    // A, then B, each refresh after a revocation; the others hear of each by
    // notification (awaited, so the next revocation hits the token they hold).
    for gw in [&a, &b] {
        idp.revoke_all();
        let r = client.get(&gw.url("/crm/x")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let g = generation(gw).unwrap();
        until("every replica adopted the new token", || async {
            [&a, &b, &c].iter().all(|r| generation(r) == Some(g))
        })
        .await;
    }

    let before = idp.requests();
    let g = generation(&c).unwrap();
    idp.revoke_all();
    let r = client.get(&c.url("/crm/x")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(idp.requests() - before, 1, "one refresh at the IdP");
    assert!(generation(&c).unwrap() > g);
    assert_eq!(idp.refresh_token_reuses(), 0);

    for gw in [a, b, c] {
        gw.stop().await;
    }
}

/// The fleet's invariants under a seeded random schedule: 3-4 replicas, rotating
/// refresh tokens (the mock IdP revokes the whole family when a spent one is
/// presented again), revocations, requests spread over all replicas (bursts are
/// concurrent), replica restarts and short database outages. After every step:
/// every request answered 200; no refresh token used twice; stored generations
/// strictly increasing; at most one token request in flight fleet-wide while the
/// database is up; after each revocation exactly one token request while it is up;
/// and the fleet converged on the stored token.
///
/// `AUTHGATE_FLEET_SEED` replays a schedule (`.ci/run` sets a fresh one and prints
/// it); without it a random seed is drawn. The seed is printed first, so a failure
/// shows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_invariants_hold_under_a_random_schedule() {
    use rand::{Rng, SeedableRng};

    let Some(db) = Db::new().await else { return };
    setup_env();
    let seed = match std::env::var("AUTHGATE_FLEET_SEED") {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .expect("AUTHGATE_FLEET_SEED: a number"),
        Err(_) => rand::random(),
    };
    println!("fleet schedule seed: {seed} (replay: AUTHGATE_FLEET_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let idp = MockIdp::start_with(true).await;
    let up = MockUpstream::with_idp(&idp).await;
    let (relay, url_env) = db.relayed(&format!("fleet_{}", db.prefix)).await;
    let toml = db.rotating_config(&idp, &up, &url_env);
    let mut replicas = Vec::new();
    let first = TestGateway::start(&toml).await;
    first.ready().await;
    let g = generation(&first).unwrap();
    replicas.push(first);
    for _ in 1..rng.random_range(3..=4) {
        replicas.push(start_after_row(&db, &toml, g).await);
    }
    let client = Client::new();
    let mut stored = db.stored_generation().await.unwrap();
    let steps = 30;
    for step in 0..steps {
        let kind = rng.random_range(0..10);
        let issued_before = idp.requests();
        idp.reset_max_in_flight();
        let ctx = format!("seed {seed}, step {step}");
        println!("step {step}: kind {kind}, store generation {stored}");
        let mut database_up = true;
        match kind {
            // A revocation, then a burst across all replicas.
            0..=3 => {
                idp.revoke_all();
                let n = rng.random_range(5..40);
                burst(&client, &replicas, n, &mut rng, &ctx).await;
                assert_eq!(
                    idp.requests() - issued_before,
                    1,
                    "{ctx}: one token request after a revocation"
                );
            }
            // A restart: the new process adopts the stored token. Half the time a
            // revocation hits the others while it starts, so its start-up may wait
            // on the fleet lease of their refresh and get the token by notification.
            4 => {
                let i = rng.random_range(0..replicas.len());
                replicas.remove(i).stop().await;
                let revoke = rng.random_bool(0.5);
                if revoke {
                    // A slow IdP keeps the lease held while the new replica starts.
                    idp.set_delay(Duration::from_millis(rng.random_range(0..200)));
                    idp.revoke_all();
                }
                let n = rng.random_range(1..20);
                let (gw, ()) = tokio::join!(TestGateway::start(&toml), async {
                    if revoke {
                        burst(&client, &replicas, n, &mut rng, &ctx).await;
                    }
                });
                gw.ready().await;
                idp.set_delay(Duration::ZERO);
                replicas.insert(i, gw);
                burst(&client, &replicas, n, &mut rng, &ctx).await;
                let expected = u64::from(revoke);
                assert_eq!(
                    idp.requests() - issued_before,
                    expected,
                    "{ctx}: token requests"
                );
            }
            // A short database outage: serving goes on from memory; sometimes a
            // revocation meanwhile, answered by one replica refreshing on its own.
            5 => {
                database_up = false;
                relay.down();
                let n = rng.random_range(1..20);
                burst(&client, &replicas, n, &mut rng, &ctx).await;
                if rng.random_bool(0.5) {
                    idp.revoke_all();
                    let one = rng.random_range(0..replicas.len());
                    let r = client.get(&replicas[one].url("/crm/outage")).await;
                    assert_eq!(r.status, StatusCode::OK, "{ctx}: {}", r.text());
                }
                relay.up();
                for gw in &replicas {
                    let store = gw.app().gateway.store.clone();
                    until("the store reachable again", || async {
                        !store.is_failing()
                    })
                    .await;
                }
            }
            // Plain traffic.
            _ => {
                let n = rng.random_range(1..40);
                burst(&client, &replicas, n, &mut rng, &ctx).await;
                assert_eq!(
                    idp.requests(),
                    issued_before,
                    "{ctx}: traffic asked the IdP"
                );
            }
        }
        assert_eq!(
            idp.refresh_token_reuses(),
            0,
            "{ctx}: a refresh token was used twice"
        );
        if database_up {
            assert!(idp.max_in_flight() <= 1, "{ctx}: concurrent token requests");
        }
        // The fleet converges on one stored token, of a higher generation whenever
        // the IdP issued one.
        let issued = idp.requests() > issued_before;
        until("the fleet converged on the stored token", || async {
            let now = db.stored_generation().await.unwrap();
            now >= stored
                && (now > stored || !issued)
                && replicas.iter().all(|gw| {
                    generation(gw) == Some(now as u64) && token_of(gw) == token_of(&replicas[0])
                })
        })
        .await;
        let now = db.stored_generation().await.unwrap();
        assert!(now >= stored, "{ctx}: the stored generation went back");
        stored = now;
    }
    println!(
        "fleet schedule {seed}: {steps} steps, {} replicas, {} token requests, generation {stored}",
        replicas.len(),
        idp.requests()
    );
    for gw in replicas {
        gw.stop().await;
    }
}

/// `n` concurrent requests, each to a replica drawn at random; every one must
/// answer 200.
async fn burst(
    client: &Client,
    replicas: &[TestGateway],
    n: usize,
    rng: &mut impl rand::Rng,
    ctx: &str,
) {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let url = replicas[rng.random_range(0..replicas.len())].url(&format!("/crm/item/{i}"));
        let client = client.clone();
        tasks.spawn(async move {
            let r = client.get(&url).await;
            (r.status, r.text())
        });
    }
    while let Some(reply) = tasks.join_next().await {
        let (status, body) = reply.unwrap();
        assert_eq!(status, StatusCode::OK, "{ctx}: {body}");
    }
}
