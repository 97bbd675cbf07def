//! `bos simulate --demo`: registers a few GUEST and REGULAR batches through the gRPC API, requests a pipeline for
//! each once it is ready, and shows each batch's progress live until every run has ended, then a summary table.
//! It only uses the public API; the simulated services answer BOS's commands meanwhile.

use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use tonic::metadata::MetadataValue;
use tonic::transport::Channel;
use tonic::Request;

use crate::proto::huleedu::bos::v1 as api;
use crate::proto::huleedu::bos::v1::batch_service_client::BatchServiceClient;
use crate::proto::huleedu::common::v1 as pc;

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("cannot reach BOS at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error("BOS answered {0}")]
    Rpc(#[from] tonic::Status),
    #[error("the token is not a valid header value")]
    Token,
    #[error("batch {batch_id} did not finish within {seconds} s (last status {status})")]
    Timeout {
        batch_id: String,
        seconds: u64,
        status: String,
    },
}

/// One demo batch: its class (REGULAR when set) and the pipeline it asks for.
#[derive(Debug, Clone)]
pub struct DemoBatch {
    pub label: String,
    pub class_id: Option<String>,
    pub course_code: pc::CourseCode,
    pub essays: i32,
    pub pipeline: pc::PhaseName,
}

/// The default mix: GUEST and REGULAR batches, short and long pipelines, English and Swedish.
pub fn default_batches() -> Vec<DemoBatch> {
    let batch = |label: &str, class: Option<&str>, course, essays, pipeline| DemoBatch {
        label: label.to_owned(),
        class_id: class.map(str::to_owned),
        course_code: course,
        essays,
        pipeline,
    };
    vec![
        batch(
            "guest-spellcheck",
            None,
            pc::CourseCode::Eng5,
            12,
            pc::PhaseName::Spellcheck,
        ),
        batch(
            "guest-ai-feedback",
            None,
            pc::CourseCode::Sv2,
            8,
            pc::PhaseName::AiFeedback,
        ),
        batch(
            "regular-cj",
            Some("class-7a"),
            pc::CourseCode::Eng6,
            20,
            pc::PhaseName::CjAssessment,
        ),
        batch(
            "regular-nlp",
            Some("class-9c"),
            pc::CourseCode::Sv1,
            15,
            pc::PhaseName::Nlp,
        ),
    ]
}

/// How one batch ended, for the summary table.
#[derive(Debug, Clone)]
pub struct DemoResult {
    pub label: String,
    pub batch_id: String,
    pub class_type: String,
    pub pipeline: String,
    pub run_status: String,
    pub phases: String,
    pub succeeded: i32,
    pub failed: i32,
    pub elapsed: Duration,
}

/// Runs the demo against the API at `addr` (e.g. `http://127.0.0.1:50051`) with a bearer `token`.
pub async fn run(
    addr: &str,
    token: &str,
    batches: Vec<DemoBatch>,
    deadline: Duration,
) -> Result<Vec<DemoResult>, DemoError> {
    let channel = Channel::from_shared(addr.to_owned())
        .map_err(|_| DemoError::Token)?
        .connect()
        .await
        .map_err(|source| DemoError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let bearer: MetadataValue<_> = format!("Bearer {token}")
        .parse()
        .map_err(|_| DemoError::Token)?;
    let client = BatchServiceClient::with_interceptor(channel, move |mut request: Request<()>| {
        request
            .metadata_mut()
            .insert("authorization", bearer.clone());
        Ok(request)
    });
    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut tasks = Vec::new();
    for batch in batches {
        let bar = bars.add(ProgressBar::new(1));
        bar.set_style(style.clone());
        bar.set_prefix(batch.label.clone());
        let client = client.clone();
        tasks.push(tokio::spawn(drive(client, batch, bar, deadline)));
    }
    let mut results = Vec::new();
    for task in tasks {
        match task.await {
            Ok(result) => results.push(result?),
            Err(join) => tracing::error!(%join, "demo task panicked"),
        }
    }
    Ok(results)
}

async fn drive<C>(
    mut client: BatchServiceClient<C>,
    batch: DemoBatch,
    bar: ProgressBar,
    deadline: Duration,
) -> Result<DemoResult, DemoError>
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone + Send,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    C::Future: Send,
{
    let started = Instant::now();
    let registered = client
        .register_batch(api::RegisterBatchRequest {
            expected_essay_count: batch.essays,
            course_code: batch.course_code as i32,
            class_id: batch.class_id.clone(),
            student_prompt_ref: "prompt://demo".to_owned(),
            assignment_id: "demo-assignment".to_owned(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let batch_id = registered.batch_id;
    bar.set_message("awaiting content");
    wait_for(&mut client, &batch_id, &bar, started, deadline, |view| {
        view.status == pc::BatchStatus::ReadyForPipelineExecution as i32
    })
    .await?;
    bar.inc(1);
    let accepted = client
        .request_pipeline(api::RequestPipelineRequest {
            batch_id: batch_id.clone(),
            requested_pipeline: batch.pipeline as i32,
            ..Default::default()
        })
        .await?
        .into_inner();
    bar.set_length(1 + accepted.phases.len() as u64);
    let run_id = accepted.run_id;
    let ended = |view: &api::BatchView| {
        all_runs(view)
            .any(|run| run.run_id == run_id && run.status != pc::PipelineRunStatus::Running as i32)
    };
    let view = wait_for(&mut client, &batch_id, &bar, started, deadline, ended).await?;
    let run = all_runs(&view)
        .find(|run| run.run_id == run_id)
        .cloned()
        .unwrap_or_default();
    bar.finish_with_message(enum_name(
        pc::PipelineRunStatus::try_from(run.status).map(|s| s.as_str_name()),
    ));
    Ok(DemoResult {
        label: batch.label,
        batch_id,
        class_type: enum_name(pc::ClassType::try_from(view.class_type).map(|c| c.as_str_name())),
        pipeline: enum_name(
            pc::PhaseName::try_from(run.requested_pipeline).map(|p| p.as_str_name()),
        ),
        run_status: enum_name(pc::PipelineRunStatus::try_from(run.status).map(|s| s.as_str_name())),
        phases: run
            .phases
            .iter()
            .map(|p| enum_name(pc::PhaseName::try_from(p.phase).map(|n| n.as_str_name())))
            .collect::<Vec<_>>()
            .join(">"),
        succeeded: run.successful_essay_count,
        failed: run.failed_essay_count,
        elapsed: started.elapsed(),
    })
}

fn all_runs(view: &api::BatchView) -> impl Iterator<Item = &api::PipelineRunView> {
    view.current_run.iter().chain(view.past_runs.iter())
}

/// Polls the batch's status until `done` holds, moving the bar with the phases that have concluded.
async fn wait_for<C>(
    client: &mut BatchServiceClient<C>,
    batch_id: &str,
    bar: &ProgressBar,
    started: Instant,
    deadline: Duration,
    done: impl Fn(&api::BatchView) -> bool,
) -> Result<api::BatchView, DemoError>
where
    C: tonic::client::GrpcService<tonic::body::Body> + Clone + Send,
    C::Error: Into<tonic::codegen::StdError>,
    C::ResponseBody: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    <C::ResponseBody as tonic::codegen::Body>::Error: Into<tonic::codegen::StdError> + Send,
    C::Future: Send,
{
    loop {
        let view = client
            .get_batch_status(api::GetBatchStatusRequest {
                batch_id: batch_id.to_owned(),
            })
            .await?
            .into_inner()
            .batch
            .unwrap_or_default();
        if let Some(run) = &view.current_run {
            let concluded = run.phases.iter().filter(|p| is_concluded(p.status)).count() as u64;
            bar.set_position(1 + concluded);
            let active = run.phases.iter().find(|p| !is_concluded(p.status));
            if let Some(phase) = active {
                bar.set_message(enum_name(
                    pc::PhaseName::try_from(phase.phase).map(|n| n.as_str_name()),
                ));
            }
        }
        if done(&view) {
            return Ok(view);
        }
        if started.elapsed() > deadline {
            return Err(DemoError::Timeout {
                batch_id: batch_id.to_owned(),
                seconds: deadline.as_secs(),
                status: enum_name(pc::BatchStatus::try_from(view.status).map(|s| s.as_str_name())),
            });
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn is_concluded(status: i32) -> bool {
    use pc::PipelineExecutionStatus as S;
    [
        S::CompletedSuccessfully,
        S::CompletedWithPartialSuccess,
        S::Failed,
        S::SkippedDueToDependencyFailure,
        S::Cancelled,
    ]
    .iter()
    .any(|s| *s as i32 == status)
}

/// The enum value's name without its type prefix (`PHASE_NAME_NLP` → `NLP`).
fn enum_name<E>(name: Result<&'static str, E>) -> String {
    let name = name.unwrap_or("UNKNOWN");
    for prefix in [
        "PIPELINE_RUN_STATUS_",
        "PHASE_NAME_",
        "CLASS_TYPE_",
        "BATCH_STATUS_",
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return rest.to_owned();
        }
    }
    name.to_owned()
}

/// The summary table printed after the demo.
pub fn summary_table(results: &[DemoResult]) -> String {
    let mut out = format!(
        "{:<18} {:<8} {:<14} {:<24} {:<38} {:>9} {:>6} {:>8}\n",
        "batch", "type", "pipeline", "run status", "phases", "succeeded", "failed", "seconds"
    );
    for r in results {
        out.push_str(&format!(
            "{:<18} {:<8} {:<14} {:<24} {:<38} {:>9} {:>6} {:>8.1}\n",
            r.label,
            r.class_type,
            r.pipeline,
            r.run_status,
            r.phases,
            r.succeeded,
            r.failed,
            r.elapsed.as_secs_f64()
        ));
    }
    out
}
