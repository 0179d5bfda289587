"""/metrics in the Prometheus text exposition format."""

from __future__ import annotations

# (snapshot key, metric name, type, help)
_METRICS = [
    ("running", "dendrite_requests_running", "gauge", "Generation requests in progress."),
    ("queued", "dendrite_requests_queued", "gauge", "Commands waiting for the engine thread."),
    ("handles", "dendrite_sequences_live", "gauge", "Live fork handles (kept sequences)."),
    ("pages_used", "dendrite_kv_pages_used", "gauge", "KV cache pages in use."),
    ("pages_free", "dendrite_kv_pages_free", "gauge", "KV cache pages free."),
    ("pages_total", "dendrite_kv_pages_total", "gauge", "KV cache pages in the pool."),
    ("tokens_per_second", "dendrite_generation_tokens_per_second", "gauge",
     "Generated tokens per second over the last 10 s."),
    ("generated_tokens", "dendrite_generation_tokens_total", "counter", "Generated tokens."),
    ("requests", "dendrite_requests_total", "counter", "Generation requests started."),
    ("forks", "dendrite_forks_total", "counter", "Sequences made by fork."),
    ("steps", "dendrite_engine_steps_total", "counter", "Batched engine steps."),
    ("preemptions", "dendrite_preemptions_total", "counter", "Sequences preempted for pages."),
    ("errors", "dendrite_engine_errors_total", "counter", "Engine steps that failed."),
    ("handles_expired", "dendrite_sequences_expired_total", "counter",
     "Fork handles released by their TTL."),
    ("programs", "dendrite_programs_total", "counter", "Programs run."),
]


def prometheus_text(snapshot: dict) -> str:
    """Render `EngineWorker.snapshot()` as Prometheus text (version 0.0.4)."""
    lines = []
    for key, name, kind, doc in _METRICS:
        if key not in snapshot:
            continue
        lines.append(f"# HELP {name} {doc}")
        lines.append(f"# TYPE {name} {kind}")
        lines.append(f"{name} {float(snapshot[key]):g}")
    return "\n".join(lines) + "\n"
