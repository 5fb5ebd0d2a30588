-- view: unique_events
-- key: stream, event_id
-- Every event once: the first message of each event id in its stream. A message stored
-- twice (a DLQ redrive, a republish after the duplicate window) counts once; plain control
-- commands (no event id) are left out. The typed views read this view, not `events`.
SELECT *
FROM events
WHERE event_id IS NOT NULL
QUALIFY row_number() OVER (PARTITION BY stream, event_id ORDER BY seq) = 1
