-- view: fossils
-- key: fossil_id
-- One row per recorded fossil (fossil.recorded): an observation of a physical system.
WITH src AS (
    SELECT seq, event_id, event_at, source, published_at,
        from_json(payload, '{"fossil_id": "VARCHAR", "domain": "VARCHAR", "context": "DOUBLE[]",
            "state": "DOUBLE[]", "energy": "DOUBLE", "observed_at": "TIMESTAMPTZ",
            "provenance": {"source": "VARCHAR", "verifier": "VARCHAR", "verified": "BOOLEAN", "detail": "VARCHAR"}}') AS d
    FROM unique_events
    WHERE stream = 'FOSSILS' AND type = 'fossil.recorded'
)
SELECT
    d.fossil_id AS fossil_id,
    d.domain AS domain,
    d.energy AS energy,
    d.context AS context,
    d.state AS state,
    d.observed_at AS observed_at,
    d.provenance.source AS provenance_source,
    d.provenance.verifier AS verifier,
    d.provenance.verified AS verified,
    coalesce(d.provenance.detail, '') AS provenance_detail,
    event_id,
    event_at AS recorded_at,
    source,
    seq
FROM src
