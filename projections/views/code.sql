-- view: code
-- key: proposal_id
-- One row per generated code proposal (code.proposed), with the intent it answers.
WITH src AS (
    SELECT seq, event_id, event_at, source,
        from_json(payload, '{"proposal_id": "VARCHAR", "intent_id": "VARCHAR", "code": "VARCHAR",
            "language": "VARCHAR", "generator": "VARCHAR", "prompt": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'INTENTS' AND type = 'code.proposed'
)
SELECT
    d.proposal_id AS proposal_id,
    d.intent_id AS intent_id,
    d.code AS code,
    coalesce(d.language, 'python') AS language,
    coalesce(d.generator, '') AS generator,
    coalesce(d.prompt, '') AS prompt,
    event_id,
    event_at AS proposed_at,
    source,
    seq
FROM src
