//! The process-wide Prometheus recorder behind `GET /metrics`.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The handle that renders every metric recorded through the `metrics` facade.
///
/// The first call installs the global recorder; several servers in one process (tests) share it.
pub fn prometheus_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new().build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; /metrics then shows just our
            // own build info, which is still a valid exposition.
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics is partial");
            }
            metrics::gauge!("bos_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            handle
        })
        .clone()
}

/// Renders the Prometheus text exposition.
pub fn render() -> String {
    let handle = prometheus_handle();
    handle.run_upkeep();
    handle.render()
}
