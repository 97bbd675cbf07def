//! Health over the real port (defect 20): `GET /healthz` and grpc.health.v1 report the database, the broker and
//! Redis. A real PostgreSQL taken away (connections refused), the mock cluster taken down, Redis unreachable.

mod support;

use std::time::Duration;

use bos::config::{Config, ConfigLayer};
use bos::events::broker::EmbeddedBroker;
use sea_orm::{ConnectOptions, ConnectionTrait, Database};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use support::kafka::start_cluster;
use support::{pg_admin_url, TestDb};

const DEADLINE: Duration = Duration::from_secs(45);

struct Server {
    addr: std::net::SocketAddr,
    db: TestDb,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), bos::app::AppError>>,
}

impl Server {
    async fn start(broker: &EmbeddedBroker, redis_url: Option<&str>) -> Server {
        let db = TestDb::postgres().await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_layer(ConfigLayer {
            listen_addr: Some(addr.to_string()),
            database_url: Some(db.url.clone()),
            kafka_brokers: Some(broker.bootstrap_servers().to_owned()),
            kafka_group: Some(format!("bos-health-{}", uuid::Uuid::now_v7())),
            redis_url: redis_url.map(str::to_owned),
            jwt_secret: Some("health-tests-hs256-secret-0123456789".to_owned()),
            internal_api_key: Some("health-tests-internal-key-0123456789".to_owned()),
            ..Default::default()
        })
        .unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(bos::app::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Server {
            addr,
            db,
            stop,
            task,
        }
    }

    /// Polls `/healthz` until `want` holds for its (code, body).
    async fn wait_health(&self, what: &str, want: impl Fn(u16, &Value) -> bool) -> (u16, Value) {
        let http = reqwest::Client::new();
        let until = tokio::time::Instant::now() + DEADLINE;
        let mut last = None;
        while tokio::time::Instant::now() < until {
            assert!(!self.task.is_finished(), "the server stopped");
            if let Ok(response) = http
                .get(format!("http://{}/healthz", self.addr))
                .send()
                .await
            {
                let code = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if want(code, &body) {
                    return (code, body);
                }
                last = Some((code, body));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("/healthz never became {what}; last answer {last:?}");
    }

    async fn grpc_status(&self) -> i32 {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .status
    }

    async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
        drop(self.db);
    }
}

fn serving(checks: Value) -> impl Fn(u16, &Value) -> bool {
    move |code, body| code == 200 && *body == json!({"status": "SERVING", "checks": checks})
}

fn not_serving_with(dependency: &'static str) -> impl Fn(u16, &Value) -> bool {
    move |code, body| {
        code == 503 && body["status"] == "NOT_SERVING" && body["checks"][dependency] == "down"
    }
}

/// Refuses new connections to the test database and ends the open ones: to BOS the database is gone.
async fn database_reachable(db: &TestDb, reachable: bool) {
    let name = db
        .url
        .rsplit('/')
        .next()
        .unwrap()
        .split('?')
        .next()
        .unwrap();
    let mut options = ConnectOptions::new(pg_admin_url());
    options.max_connections(1).sqlx_logging(false);
    let admin = Database::connect(options).await.unwrap();
    admin
        .execute_unprepared(&format!(
            "ALTER DATABASE \"{name}\" WITH ALLOW_CONNECTIONS {reachable}"
        ))
        .await
        .unwrap();
    if !reachable {
        admin
            .execute_unprepared(&format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            ))
            .await
            .unwrap();
    }
    admin.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn database_and_broker_outages_are_not_serving_and_recover() {
    let broker = start_cluster();
    let server = Server::start(&broker, Some("redis://127.0.0.1:6379")).await;
    let all_ok = json!({"database": "ok", "broker": "ok", "redis": "ok"});
    server.wait_health("SERVING", serving(all_ok.clone())).await;
    assert_eq!(server.grpc_status().await, ServingStatus::Serving as i32);

    broker.set_down(true).unwrap();
    let (_, body) = server
        .wait_health("NOT_SERVING (broker)", not_serving_with("broker"))
        .await;
    assert_eq!(body["checks"]["database"], "ok");
    assert_eq!(server.grpc_status().await, ServingStatus::NotServing as i32);
    broker.set_down(false).unwrap();
    server
        .wait_health("SERVING again", serving(all_ok.clone()))
        .await;
    assert_eq!(server.grpc_status().await, ServingStatus::Serving as i32);

    database_reachable(&server.db, false).await;
    let (_, body) = server
        .wait_health("NOT_SERVING (database)", not_serving_with("database"))
        .await;
    assert_eq!(body["checks"]["redis"], "ok");
    assert_eq!(server.grpc_status().await, ServingStatus::NotServing as i32);
    database_reachable(&server.db, true).await;
    server.wait_health("SERVING again", serving(all_ok)).await;
    assert_eq!(server.grpc_status().await, ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_down_is_degraded_not_down_and_no_redis_is_disabled() {
    let broker = start_cluster();
    // Port 1 on loopback refuses connections: a configured Redis that is not there.
    let server = Server::start(&broker, Some("redis://127.0.0.1:1")).await;
    server
        .wait_health(
            "SERVING with Redis bypassed",
            serving(json!({"database": "ok", "broker": "ok", "redis": "bypassed"})),
        )
        .await;
    assert_eq!(server.grpc_status().await, ServingStatus::Serving as i32);
    server.stop().await;

    let server = Server::start(&broker, None).await;
    server
        .wait_health(
            "SERVING without Redis",
            serving(json!({"database": "ok", "broker": "ok", "redis": "disabled"})),
        )
        .await;
    server.stop().await;
}
