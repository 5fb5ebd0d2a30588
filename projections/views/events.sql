-- view: events
-- key: stream, seq
-- Every archived message, one row per stream sequence, exactly as the stream holds it: the
-- envelope in typed columns and the payload (the event's `data`) as JSON text. Plain-JSON
-- control commands have type = their subject, payload = their body, null envelope columns.
SELECT
    stream,
    seq,
    subject,
    type,
    v,
    id AS event_id,
    "at" AS event_at,
    source,
    correlation_id,
    causation_id,
    kid,
    signed,
    published_at,
    headers,
    payload
FROM read_parquet(
    'stream=*/date=*/*.parquet',
    hive_partitioning = true,
    hive_types = {'stream': 'VARCHAR', 'date': 'DATE'}
)
