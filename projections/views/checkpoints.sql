-- view: checkpoints
-- key: checkpoint_id
-- One row per checkpoint: produced, then verified or rejected, and its latest promotion
-- (alias, version, model kind).
-- `metrics` are the worker's (at training); `verified_metrics` the daemon's verifier's own,
-- measured on held-out fossils when it judged the checkpoint (verified or rejected), with its
-- headline numbers typed.
WITH src AS (
    SELECT seq, event_at, type,
        from_json(payload, '{"checkpoint_id": "VARCHAR", "job_id": "VARCHAR", "domain": "VARCHAR", "uri": "VARCHAR",
            "sha256": "VARCHAR", "size": "BIGINT", "metrics": "JSON", "config_hash": "VARCHAR", "margin": "DOUBLE",
            "baseline_checkpoint_id": "VARCHAR", "baseline_metrics": "JSON", "reasons": "VARCHAR[]", "alias": "VARCHAR", "version": "BIGINT",
            "kind": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'CHECKPOINTS' AND type LIKE 'checkpoint.%'
)
SELECT
    d.checkpoint_id AS checkpoint_id,
    CASE
        WHEN count(*) FILTER (WHERE type = 'checkpoint.promoted') > 0 THEN 'promoted'
        WHEN count(*) FILTER (WHERE type = 'checkpoint.rejected') > 0 THEN 'rejected'
        WHEN count(*) FILTER (WHERE type = 'checkpoint.verified') > 0 THEN 'verified'
        ELSE 'produced'
    END AS status,
    arg_min(d.domain, seq) AS domain,
    arg_min(d.job_id, seq) FILTER (WHERE type = 'checkpoint.produced') AS job_id,
    arg_min(d.uri, seq) FILTER (WHERE type = 'checkpoint.produced') AS uri,
    arg_min(d.sha256, seq) FILTER (WHERE type = 'checkpoint.produced') AS sha256,
    arg_min(d.size, seq) FILTER (WHERE type = 'checkpoint.produced') AS size,
    arg_min(d.metrics, seq) FILTER (WHERE type = 'checkpoint.produced') AS metrics,
    arg_min(d.config_hash, seq) FILTER (WHERE type = 'checkpoint.produced') AS config_hash,
    min(event_at) FILTER (WHERE type = 'checkpoint.produced') AS produced_at,
    min(event_at) FILTER (WHERE type = 'checkpoint.verified') AS verified_at,
    arg_min(d.margin, seq) FILTER (WHERE type = 'checkpoint.verified') AS margin,
    arg_min(d.baseline_checkpoint_id, seq) FILTER (WHERE type IN ('checkpoint.verified', 'checkpoint.rejected')) AS baseline_checkpoint_id,
    arg_min(d.metrics, seq) FILTER (WHERE type IN ('checkpoint.verified', 'checkpoint.rejected')) AS verified_metrics,
    arg_min(d.baseline_metrics, seq) FILTER (WHERE type IN ('checkpoint.verified', 'checkpoint.rejected')) AS baseline_metrics,
    TRY_CAST(verified_metrics->>'$.decision_feasible' AS DOUBLE) AS verified_feasible,
    TRY_CAST(verified_metrics->>'$.decision_gap_median' AS DOUBLE) AS verified_gap_median,
    TRY_CAST(verified_metrics->>'$.decision_gap_p95' AS DOUBLE) AS verified_gap_p95,
    TRY_CAST(verified_metrics->>'$.decision_savings_captured' AS DOUBLE) AS verified_savings_captured,
    TRY_CAST(verified_metrics->>'$.decision_regret' AS DOUBLE) AS verified_regret,
    TRY_CAST(baseline_metrics->>'$.decision_regret' AS DOUBLE) AS baseline_regret,
    TRY_CAST(verified_metrics->>'$.heldout_dsm' AS DOUBLE) AS verified_heldout_dsm,
    min(event_at) FILTER (WHERE type = 'checkpoint.rejected') AS rejected_at,
    arg_min(d.reasons, seq) FILTER (WHERE type = 'checkpoint.rejected') AS rejection_reasons,
    max(event_at) FILTER (WHERE type = 'checkpoint.promoted') AS promoted_at,
    arg_max(d.alias, seq) FILTER (WHERE type = 'checkpoint.promoted') AS alias,
    arg_max(d.version, seq) FILTER (WHERE type = 'checkpoint.promoted') AS version,
    -- the model kind of that promotion (an alias has one head per domain and kind); none
    -- written (before 2026-12-02): an EBDM's, a code model's in domain genn
    arg_max(coalesce(nullif(d.kind, ''), CASE WHEN d.domain = 'genn' THEN 'code' ELSE 'ebdm' END), seq)
        FILTER (WHERE type = 'checkpoint.promoted') AS kind,
    min(seq) AS first_seq,
    max(seq) AS last_seq
FROM src
WHERE d.checkpoint_id IS NOT NULL
GROUP BY d.checkpoint_id
