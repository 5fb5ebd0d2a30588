-- view: verdicts
-- key: verdict_id
-- One row per ruling (verdict.issued) of the safety gate or a human, on an intent, code,
-- a proposed state, a checkpoint or a deployment.
WITH src AS (
    SELECT seq, event_id, event_at, source,
        from_json(payload, '{"verdict_id": "VARCHAR", "subject_id": "VARCHAR", "subject_type": "VARCHAR",
            "decision": "VARCHAR", "gate": "VARCHAR", "reasons": "VARCHAR[]", "final": "BOOLEAN", "by": "VARCHAR",
            "kind": "VARCHAR", "domain": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'VERDICTS' AND type = 'verdict.issued'
)
SELECT
    d.verdict_id AS verdict_id,
    d.subject_id AS subject_id,
    d.subject_type AS subject_type,
    d.decision AS decision,
    d.gate AS gate,
    coalesce(d.reasons, []::VARCHAR[]) AS reasons,
    coalesce(d.final, true) AS final,
    coalesce(d.by, 'safety') AS ruled_by,
    coalesce(d.kind, '') AS kind,
    coalesce(d.domain, '') AS domain,
    event_id,
    event_at AS ruled_at,
    source,
    seq
FROM src
