"""Profiling dense coarsening: the analytic cost model, the benchmark harness, memory
measurement, reports and plots, accuracy and max-batch searches, the model's training step, the
ahead-of-time compile check, and provenance (versions, device) for every recorded number."""
