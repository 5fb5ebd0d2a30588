-- view: gear_changes
-- key: event_id
-- One row per gear change (gear.changed), with v1 events (a level number) upcast in SQL
-- the way bus.codec upcasts them: level 1..4 = STANDARD, ACCELERATED, HYPER, SINGULARITY.
SELECT
    event_id,
    event_at AS changed_at,
    CASE WHEN v = 1 THEN NULL ELSE payload->>'from_gear' END AS from_gear,
    CASE
        WHEN v = 1 THEN ['STANDARD', 'ACCELERATED', 'HYPER', 'SINGULARITY'][TRY_CAST(payload->>'level' AS INTEGER)]
        ELSE payload->>'to_gear'
    END AS to_gear,
    coalesce(payload->>'by', '') AS changed_by,
    coalesce(payload->>'reason', '') AS reason,
    v,
    source,
    seq
FROM unique_events
WHERE stream = 'CONTROL' AND type = 'gear.changed'
