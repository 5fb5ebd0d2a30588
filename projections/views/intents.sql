-- view: intents
-- key: intent_id
-- One row per intent (intent.created): what the daemon (or a person) asked for, in which context.
WITH src AS (
    SELECT seq, event_id, event_at, source, correlation_id,
        from_json(payload, '{"intent_id": "VARCHAR", "kind": "VARCHAR", "domain": "VARCHAR", "params": "JSON",
            "reason": "VARCHAR", "gear": "VARCHAR", "hypothesis": "BIGINT"}') AS d
    FROM unique_events
    WHERE stream = 'INTENTS' AND type = 'intent.created'
)
SELECT
    d.intent_id AS intent_id,
    d.kind AS kind,
    d.domain AS domain,
    coalesce(d.params, '{}') AS params,
    coalesce(d.reason, '') AS reason,
    coalesce(d.gear, 'STANDARD') AS gear,
    coalesce(d.hypothesis, 0) AS hypothesis,
    event_id,
    event_at AS created_at,
    source,
    seq
FROM src
