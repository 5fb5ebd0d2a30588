-- view: jobs
-- key: job_id
-- One row per training job: its dispatch, attempts, progress and outcome (job.* events).
WITH src AS (
    SELECT seq, event_at, type,
        from_json(payload, '{"job_id": "VARCHAR", "intent_id": "VARCHAR", "domain": "VARCHAR", "pool": "VARCHAR",
            "config": "JSON", "config_hash": "VARCHAR", "worker": "VARCHAR", "device": "VARCHAR", "attempt": "BIGINT",
            "step": "BIGINT", "total_steps": "BIGINT", "loss": "DOUBLE", "checkpoint_id": "VARCHAR",
            "duration_s": "DOUBLE", "metrics": "JSON", "error": "VARCHAR", "final": "BOOLEAN"}') AS d
    FROM unique_events
    WHERE stream = 'TRAINING' AND type LIKE 'job.%'
)
SELECT
    d.job_id AS job_id,
    CASE
        WHEN count(*) FILTER (WHERE type = 'job.completed') > 0 THEN 'completed'
        WHEN count(*) FILTER (WHERE type = 'job.failed' AND d.final) > 0 THEN 'failed'
        WHEN count(*) FILTER (WHERE type = 'job.started') > 0 THEN 'running'
        ELSE 'dispatched'
    END AS status,
    arg_min(d.intent_id, seq) FILTER (WHERE type = 'job.dispatched') AS intent_id,
    arg_min(d.domain, seq) FILTER (WHERE type = 'job.dispatched') AS domain,
    arg_min(d.pool, seq) FILTER (WHERE type = 'job.dispatched') AS pool,
    arg_min(d.config, seq) FILTER (WHERE type = 'job.dispatched') AS config,
    arg_min(d.config_hash, seq) FILTER (WHERE type = 'job.dispatched') AS config_hash,
    min(event_at) FILTER (WHERE type = 'job.dispatched') AS dispatched_at,
    min(event_at) FILTER (WHERE type = 'job.started') AS started_at,
    count(*) FILTER (WHERE type = 'job.started') AS attempts,
    arg_max(d.worker, seq) FILTER (WHERE type = 'job.started') AS worker,
    arg_max(d.device, seq) FILTER (WHERE type = 'job.started') AS device,
    max(d.step) FILTER (WHERE type = 'job.progress') AS last_step,
    arg_max(d.total_steps, seq) FILTER (WHERE type = 'job.progress') AS total_steps,
    arg_max(d.loss, seq) FILTER (WHERE type = 'job.progress') AS last_loss,
    max(event_at) FILTER (WHERE type = 'job.completed') AS completed_at,
    arg_max(d.checkpoint_id, seq) FILTER (WHERE type = 'job.completed') AS checkpoint_id,
    arg_max(d.duration_s, seq) FILTER (WHERE type = 'job.completed') AS duration_s,
    arg_max(d.metrics, seq) FILTER (WHERE type = 'job.completed') AS metrics,
    max(event_at) FILTER (WHERE type = 'job.failed') AS failed_at,
    arg_max(d.error, seq) FILTER (WHERE type = 'job.failed') AS error,
    min(seq) AS first_seq,
    max(seq) AS last_seq
FROM src
WHERE d.job_id IS NOT NULL
GROUP BY d.job_id
