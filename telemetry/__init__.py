"""What both services share to export OpenTelemetry traces: when tracing is on, the tracer
provider with its OTLP exporter, and marking a span failed. Each service keeps its own spans."""
