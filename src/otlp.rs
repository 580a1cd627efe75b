//! OpenTelemetry export of the gateway's spans over OTLP/HTTP (protobuf), built with the `otlp`
//! feature: a `tracing` layer that hands `walcast`'s spans (`session`, `join`, `operation`) and
//! their events at info and above to a batch exporter, and the guard that flushes it at exit.
//!
//! Owns: the tracer provider, its resource (`service.name` is `walcast` unless
//! `OTEL_SERVICE_NAME` says otherwise) and the layer's filter. Must not: add fields to spans (what
//! a span carries is decided where it is made, and never a row value, filter or token), or be
//! started inside the async runtime (its HTTP client runs a thread of its own).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Why the export could not start.
#[derive(Debug, thiserror::Error)]
#[error("OpenTelemetry export to {url}: {source}")]
pub struct OtlpError {
    url: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// The running export: flushed and stopped when dropped (after the runtime has ended).
pub struct Export {
    provider: SdkTracerProvider,
}

impl Drop for Export {
    fn drop(&mut self) {
        // Spans that ended since the last batch go now; an unreachable collector is reported by
        // the exporter's own log and does not hold the exit past its timeout.
        let _ = self.provider.shutdown();
    }
}

/// The layer that exports to `traces_url`, and its guard.
pub fn layer<S>(traces_url: &str) -> Result<(impl Layer<S>, Export), OtlpError>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(traces_url)
        .build()
        .map_err(|source| OtlpError { url: traces_url.to_owned(), source })?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("walcast");
    }
    let resource = resource
        .with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    let tracer = provider.tracer("walcast");
    // Only the gateway's own spans: not the HTTP client's or the exporter's (which would feed
    // back into the export).
    let filter = Targets::new().with_target("walcast", tracing::Level::INFO);
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(filter);
    Ok((layer, Export { provider }))
}
