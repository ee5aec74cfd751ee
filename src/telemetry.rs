//! Logs and traces.
//!
//! - Logs: `tracing` to stderr, text or JSON (`TALLY_LOG_FORMAT`), levels from `RUST_LOG`.
//! - Traces: `tracing-opentelemetry` with an OTLP/HTTP (protobuf) exporter, off unless the
//!   standard `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set;
//!   `OTEL_SERVICE_NAME` names the service (default `tally`).
//! - Propagation: W3C `traceparent`. The context of the request that created an order is
//!   stored with it; each task attempt is a child of it (minutes later, in another process),
//!   and each webhook call carries the call's own `traceparent`.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::LogFormat;

/// Flushes and shuts the exporter down when dropped (at process exit).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether traces are exported.
    pub fn tracing_enabled(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports every finished span now.
    pub fn flush(&self) {
        if let Some(p) = &self.provider {
            let _ = p.force_flush();
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

fn env_set(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.trim().is_empty())
}

/// Logging, plus trace export when the OTLP environment asks for it.
pub fn init(format: LogFormat) -> Telemetry {
    let configured =
        env_set("OTEL_EXPORTER_OTLP_ENDPOINT") || env_set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
    init_with(
        format,
        configured.then(String::new),
        "info,sqlx=warn",
        BoxMakeWriter::new(std::io::stderr),
    )
}

/// Like [`init`] with an explicit traces endpoint (`Some("")`: from the environment) and a
/// default filter for when `RUST_LOG` is unset. Tests use it; it sets the global subscriber,
/// so it takes effect once per process.
pub fn init_with(
    format: LogFormat,
    endpoint: Option<String>,
    default_filter: &str,
    writer: BoxMakeWriter,
) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = match format {
        // JSON lines carry the current span's fields, `trace_id` among them.
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(writer)
            .boxed(),
        LogFormat::Text => tracing_subscriber::fmt::layer().with_writer(writer).boxed(),
    };
    let provider = endpoint.and_then(|ep| match build_provider(ep) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("warning: traces are off: {e}");
            None
        }
    });
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("tally")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Telemetry { provider }
}

fn build_provider(endpoint: String) -> Result<SdkTracerProvider, String> {
    crate::http::install_crypto();
    // The exporter's blocking HTTP client must not be created on an async runtime thread.
    std::thread::spawn(move || {
        use opentelemetry_otlp::WithExportConfig;
        let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http();
        if !endpoint.is_empty() {
            builder = builder.with_endpoint(endpoint);
        }
        let exporter = builder.build().map_err(|e| e.to_string())?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(
                std::env::var("OTEL_SERVICE_NAME")
                    .ok()
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "tally".into()),
            )
            .build();
        Ok(SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build())
    })
    .join()
    .map_err(|_| "building the OTLP exporter panicked".to_string())?
}

/// The W3C `traceparent` of `span`, when it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// Records the span's trace id in its `trace_id` field, so log lines inside it carry it.
pub fn record_trace_id(span: &tracing::Span) {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// Makes `span` a child of the context in `traceparent` (a stored or incoming header).
pub fn set_parent(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}
