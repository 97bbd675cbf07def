//! `bos bench` end to end in a tiny configuration: the generator starts its own database, mock cluster and
//! `bos serve`, drives them and reports figures with their references. Only the shape of the report and the absence
//! of errors are asserted here; the figures themselves live in BENCHMARKS.md.

use std::process::Command;

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_bos"))
        .arg("bench")
        .args(args)
        .args(["--max-secs", "120"])
        .env("RUST_LOG", "error")
        .output()
        .expect("run bos bench");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "bos bench {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn line<'a>(report: &'a str, prefix: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{report}"))
}

#[test]
fn transitions_drive_every_batch_through_its_pipeline_and_report_a_ratio() {
    let report = bench(&["transitions", "--batches", "4", "--raw-seconds", "1"]);
    let transitions = line(&report, "transition (event in -> record out)");
    // Four batches × three measured transitions, none lost.
    assert!(transitions.contains(" 12 ok"), "{transitions}");
    assert!(transitions.ends_with("errors: none"), "{transitions}");
    let raw = line(&report, "raw CAS UPDATE");
    assert!(raw.ends_with("errors: none"), "{raw}");
    assert!(line(&report, "RATIO transitions/s").contains("target >= 0.70"));
}

#[test]
fn register_and_status_report_latencies_and_ratios() {
    let report = bench(&["register", "--rounds", "2", "--essays", "50"]);
    let register = line(&report, "RegisterBatch 50 essays");
    assert!(register.contains(" 2 ok"), "{register}");
    assert!(line(&report, "TARGET RegisterBatch").contains("target < 25 ms"));

    let report = bench(&["status", "--seconds", "1", "--concurrency", "2"]);
    for path in [
        "GetBatchStatus gRPC (BOS)",
        "GetBatchStatus gRPC (bare tonic echo)",
        "GetBatchStatus HTTP/JSON (BOS)",
    ] {
        assert!(line(&report, path).ends_with("errors: none"), "{path}");
    }
    assert!(line(&report, "RATIO GetBatchStatus gRPC").contains("bare tonic echo"));
    assert!(line(&report, "RATIO GetBatchStatus HTTP/JSON").contains("vs gRPC"));
}

/// `bos bench` with `args` fails before starting anything, naming the address that is not loopback.
fn refuses_off_loopback(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_bos"))
        .arg("bench")
        .args(args)
        .env("RUST_LOG", "error")
        .output()
        .expect("run bos bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a loopback address"), "{stderr}");
}

#[test]
fn the_generator_refuses_a_broker_off_loopback() {
    refuses_off_loopback(&["transitions", "--broker", "10.1.2.3:9092"]);
}

#[test]
fn the_status_measure_refuses_a_redis_off_loopback() {
    refuses_off_loopback(&["status", "--redis-url", "redis://10.1.2.3:6379"]);
}
