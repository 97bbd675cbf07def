//! Request/response measures: GetBatchStatus over gRPC against a bare tonic echo service (this binary, `bos bench
//! echo-server`, answering the very same response bytes), the HTTP/JSON path against gRPC, and RegisterBatch of
//! 1,000 essays.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use tonic::{Request, Response, Status};

use super::process::{self, BosProcess};
use super::stack::{self, Client, Stack};
use super::stats::{verdict, Ratio, Recorder, Summary};
use super::{BenchError, Common};
use crate::proto::huleedu::bos::v1 as api;
use crate::proto::huleedu::bos::v1::batch_service_client::BatchServiceClient;
use crate::proto::huleedu::bos::v1::batch_service_server::{BatchService, BatchServiceServer};
use crate::proto::huleedu::common::v1 as pc;

/// The Redis `bos bench status` gives BOS unless told otherwise.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";

/// Flags of `bos bench status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the gRPC callers share.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Seconds per path (after one second of warm-up).
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Upper bound of calls per path.
    #[arg(long, default_value_t = 2_000_000)]
    pub max_calls: u64,
    /// Essays of the batch read.
    #[arg(long, default_value_t = 20)]
    pub essays: i32,
    /// Redis of the BOS process (loopback only): the production configuration, in which status reads may be
    /// answered from the coherent aggregate cache.
    #[arg(long, default_value = DEFAULT_REDIS_URL)]
    pub redis_url: String,
}

/// Flags of `bos bench register`.
#[derive(Debug, Clone, clap::Args)]
pub struct RegisterArgs {
    /// Measured registrations (after three warm-up ones).
    #[arg(long, default_value_t = 40)]
    pub rounds: usize,
    /// Essays per registration.
    #[arg(long, default_value_t = 1000)]
    pub essays: i32,
}

/// Flags of the hidden `bos bench echo-server`.
#[derive(Debug, Clone, clap::Args)]
pub struct EchoArgs {
    #[arg(long)]
    pub listen: SocketAddr,
    /// File holding the encoded `GetBatchStatusResponse` to answer with.
    #[arg(long)]
    pub response: PathBuf,
}

type OpFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// `tasks` callers each calling `op` back to back for `duration` (at most `max_ops` calls in all); one second of
/// warm-up first, not recorded. Prints the CPU the server (`server_pid`), PostgreSQL and the generator spent.
pub async fn closed_loop(
    name: &str,
    server_pid: u32,
    tasks: usize,
    duration: Duration,
    max_ops: u64,
    op: Arc<dyn Fn(usize) -> OpFuture + Send + Sync>,
) -> Summary {
    for warm_up in [true, false] {
        let until = Instant::now()
            + if warm_up {
                Duration::from_secs(1)
            } else {
                duration
            };
        let issued = Arc::new(AtomicU64::new(0));
        let cpu = process::CpuMeter::start(server_pid);
        let started = Instant::now();
        let handles: Vec<_> = (0..tasks.max(1))
            .map(|i| {
                let (op, issued) = (Arc::clone(&op), Arc::clone(&issued));
                tokio::spawn(async move {
                    let mut rec = Recorder::new("");
                    while Instant::now() < until && issued.fetch_add(1, Ordering::Relaxed) < max_ops
                    {
                        let at = Instant::now();
                        match op(i).await {
                            Ok(()) => rec.ok(at.elapsed()),
                            Err(code) => rec.error(code),
                        }
                    }
                    rec
                })
            })
            .collect();
        let mut total = Recorder::new(name);
        for h in handles {
            if let Ok(rec) = h.await {
                total.merge(rec);
            }
        }
        if !warm_up {
            let mut summary = total.summary();
            summary.elapsed = started.elapsed();
            summary.throughput = summary.ok as f64 / summary.elapsed.as_secs_f64();
            println!("{summary}\n  {}", cpu.per_op(summary.ok, summary.elapsed));
            return summary;
        }
    }
    unreachable!("the second pass returns")
}

fn grpc_op(clients: Vec<Client>, batch_id: String) -> Arc<dyn Fn(usize) -> OpFuture + Send + Sync> {
    Arc::new(move |i| {
        let mut client = clients[i % clients.len()].clone();
        let request = api::GetBatchStatusRequest {
            batch_id: batch_id.clone(),
        };
        Box::pin(async move {
            client
                .get_batch_status(request)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}", s.code()))
        })
    })
}

/// Registers one batch through the API.
pub async fn register(
    client: &mut Client,
    essays: i32,
) -> Result<api::RegisterBatchResponse, Status> {
    Ok(client
        .register_batch(api::RegisterBatchRequest {
            expected_essay_count: essays,
            course_code: pc::CourseCode::Eng5 as i32,
            student_prompt_ref: "prompt://bench".to_owned(),
            assignment_id: "bench".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner())
}

/// `bos bench status`.
pub async fn status(common: &Common, args: &StatusArgs) -> Result<Vec<String>, BenchError> {
    stack::require_loopback_url(&args.redis_url)?;
    let stack = Stack::start_with(common, &[("BOS_REDIS_URL", args.redis_url.clone())]).await?;
    let result = async {
        stack.bos.wait_redis_ok(Duration::from_secs(30)).await?;
        status_on(&stack.bos, args).await
    }
    .await;
    stack.stop().await;
    result
}

async fn status_on(bos: &BosProcess, args: &StatusArgs) -> Result<Vec<String>, BenchError> {
    let mut client = stack::client(&bos.url(), "bench-user").await?;
    let batch_id = register(&mut client, args.essays).await?.batch_id;
    let response = client
        .get_batch_status(api::GetBatchStatusRequest {
            batch_id: batch_id.clone(),
        })
        .await?
        .into_inner();
    let encoded = response.encode_to_vec();
    println!("GetBatchStatus response: {} bytes protobuf", encoded.len());

    let duration = Duration::from_secs(args.seconds);
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(stack::client(&bos.url(), "bench-user").await?);
    }
    bos.profile(true);
    let grpc = closed_loop(
        "GetBatchStatus gRPC (BOS)",
        bos.pid(),
        args.concurrency,
        duration,
        args.max_calls,
        grpc_op(clients, batch_id.clone()),
    )
    .await;

    bos.profile(false);
    let echo = EchoProcess::start(&encoded).await?;
    let mut echo_clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = stack::channel(&echo.url()).await?;
        echo_clients.push(BatchServiceClient::with_interceptor(
            channel,
            stack::Bearer::new("bench-user")?,
        ));
    }
    let bare = closed_loop(
        "GetBatchStatus gRPC (bare tonic echo)",
        echo.child.id(),
        args.concurrency,
        duration,
        args.max_calls,
        grpc_op(echo_clients, batch_id.clone()),
    )
    .await;
    drop(echo);

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()?;
    let url = format!("{}/v1/batches/{batch_id}/status", bos.url());
    let auth = format!("Bearer {}", stack::token("bench-user")?);
    let json = closed_loop(
        "GetBatchStatus HTTP/JSON (BOS)",
        bos.pid(),
        args.concurrency,
        duration,
        args.max_calls,
        Arc::new(move |_| {
            let request = http.get(&url).header("authorization", &auth);
            Box::pin(async move {
                let response = request.send().await.map_err(|e| format!("http:{e}"))?;
                let status = response.status();
                let body = response.bytes().await.map_err(|e| format!("http:{e}"))?;
                if status.is_success() && !body.is_empty() {
                    Ok(())
                } else {
                    Err(format!("http:{}", status.as_u16()))
                }
            })
        }),
    )
    .await;
    Ok(vec![
        Ratio {
            label: "GetBatchStatus gRPC calls/s vs bare tonic echo".into(),
            measured: grpc.throughput,
            reference: bare.throughput,
            target: 0.6,
        }
        .to_string(),
        Ratio {
            label: "GetBatchStatus HTTP/JSON calls/s vs gRPC".into(),
            measured: json.throughput,
            reference: grpc.throughput,
            target: 0.5,
        }
        .to_string(),
    ])
}

/// `bos bench register`: sequential RegisterBatch calls of `essays` essays.
pub async fn register_batches(
    common: &Common,
    args: &RegisterArgs,
) -> Result<Vec<String>, BenchError> {
    let stack = Stack::start(common).await?;
    let bos = &stack.bos;
    let result = async {
        let mut client = stack::client(&bos.url(), "bench-user").await?;
        let mut rec = Recorder::new(format!("RegisterBatch {} essays", args.essays));
        let mut cpu = process::CpuMeter::start(bos.pid());
        for round in 0..args.rounds + 3 {
            if round == 3 {
                rec.restart();
                cpu = process::CpuMeter::start(bos.pid());
            }
            let at = Instant::now();
            match register(&mut client, args.essays).await {
                Ok(r) if r.essay_ids.len() == args.essays as usize => rec.ok(at.elapsed()),
                Ok(_) => rec.error("wrong-essay-count"),
                Err(s) => rec.error(format!("{:?}", s.code())),
            }
            if Instant::now() > common.deadline() {
                break;
            }
        }
        rec.stop();
        let s = rec.summary();
        println!("{s}\n  {}", cpu.per_op(s.ok, s.elapsed));
        Ok::<_, BenchError>(vec![verdict(
            &format!("RegisterBatch of {} essays p50", args.essays),
            s.p50,
            Duration::from_millis(25),
        )])
    }
    .await;
    stack.stop().await;
    result
}

/// The bare reference: the generated tonic server, answering GetBatchStatus with fixed bytes.
struct Echo {
    response: api::GetBatchStatusResponse,
}

#[tonic::async_trait]
impl BatchService for Echo {
    async fn register_batch(
        &self,
        _: Request<api::RegisterBatchRequest>,
    ) -> Result<Response<api::RegisterBatchResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn get_batch_status(
        &self,
        _: Request<api::GetBatchStatusRequest>,
    ) -> Result<Response<api::GetBatchStatusResponse>, Status> {
        Ok(Response::new(self.response.clone()))
    }

    async fn retry_phase(
        &self,
        _: Request<api::RetryPhaseRequest>,
    ) -> Result<Response<api::RetryPhaseResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    async fn request_pipeline(
        &self,
        _: Request<api::RequestPipelineRequest>,
    ) -> Result<Response<api::RequestPipelineResponse>, Status> {
        Err(Status::unimplemented("echo"))
    }

    type WatchBatchStream =
        Pin<Box<dyn futures::Stream<Item = Result<api::WatchBatchResponse, Status>> + Send>>;

    async fn watch_batch(
        &self,
        _: Request<api::WatchBatchRequest>,
    ) -> Result<Response<Self::WatchBatchStream>, Status> {
        Err(Status::unimplemented("echo"))
    }
}

/// `bos bench echo-server`: serves the echo until killed.
pub async fn echo_server(args: &EchoArgs) -> Result<(), BenchError> {
    stack::require_loopback(&args.listen.to_string())?;
    let bytes = std::fs::read(&args.response)?;
    let response = api::GetBatchStatusResponse::decode(bytes.as_slice())
        .map_err(|e| BenchError::Setup(format!("echo response: {e}")))?;
    tonic::transport::Server::builder()
        .add_service(BatchServiceServer::new(Echo { response }))
        .serve(args.listen)
        .await?;
    Ok(())
}

/// The echo server as a process of its own, like BOS.
struct EchoProcess {
    child: Child,
    addr: SocketAddr,
    file: PathBuf,
}

impl EchoProcess {
    async fn start(response: &[u8]) -> Result<EchoProcess, BenchError> {
        let port = stack::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let file = std::env::temp_dir().join(format!(
            "bos-bench-echo-{}.bin",
            uuid::Uuid::now_v7().simple()
        ));
        std::fs::write(&file, response)?;
        let child = Command::new(std::env::current_exe()?)
            .args([
                "bench",
                "echo-server",
                "--listen",
                &addr.to_string(),
                "--response",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let echo = EchoProcess { child, addr, file };
        stack::wait_for_port(port, Duration::from_secs(10)).await?;
        Ok(echo)
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for EchoProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.file);
    }
}
