-- view: cfr
-- key: proposal_id
-- Context → Intent → Code → Review: one row per code proposal with the intent it answers
-- (its domain, params, gear: the context) and its ruling. The ruling is the last final
-- verdict on the proposal, else the last HOLD; NULL while nobody has ruled. relative_cost:
-- the sandbox's cost relative to the status quo from the ruling's scores (below 1 = better
-- than the status quo; NULL when no sandbox ran).
WITH rulings AS (
    SELECT subject_id, verdict_id, decision, gate, reasons, final, ruled_by, ruled_at, seq, event_id
    FROM verdicts
    WHERE subject_type = 'code'
    QUALIFY row_number() OVER (PARTITION BY subject_id ORDER BY final DESC, seq DESC) = 1
),
scored AS (
    SELECT event_id, TRY_CAST(json_extract(payload, '$.scores.relative_cost') AS DOUBLE) AS relative_cost
    FROM unique_events
    WHERE stream = 'VERDICTS' AND type = 'verdict.issued'
)
SELECT
    c.proposal_id,
    c.intent_id,
    i.kind,
    i.domain,
    i.params,
    i.gear,
    i.hypothesis,
    i.reason AS intent_reason,
    c.prompt,
    c.code,
    c.language,
    c.generator,
    r.decision,
    r.gate,
    r.reasons,
    r.final,
    r.ruled_by,
    r.verdict_id,
    s.relative_cost,
    i.created_at AS intent_at,
    c.proposed_at,
    r.ruled_at,
    i.seq AS intent_seq,
    c.seq AS code_seq,
    r.seq AS verdict_seq
FROM code c
LEFT JOIN intents i ON i.intent_id = c.intent_id
LEFT JOIN rulings r ON r.subject_id = c.proposal_id
LEFT JOIN scored s ON s.event_id = r.event_id
