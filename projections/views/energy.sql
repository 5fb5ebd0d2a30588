-- view: energy
-- key: measurement_id
-- One row per energy measurement (energy.measured) an edge node reported for a period, in
-- its unit (kWh of electricity or of fuel: never add the two).
WITH src AS (
    SELECT seq, event_id, event_at, source,
        from_json(payload, '{"measurement_id": "VARCHAR", "node": "VARCHAR", "deployment_id": "VARCHAR",
            "period_start": "TIMESTAMPTZ", "period_end": "TIMESTAMPTZ", "baseline_kwh": "DOUBLE",
            "actual_kwh": "DOUBLE", "method": "VARCHAR", "domain": "VARCHAR",
            "meter": "VARCHAR", "unit": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'DEPLOY' AND type = 'energy.measured'
)
SELECT
    d.measurement_id AS measurement_id,
    d.node AS node,
    coalesce(d.domain, '') AS domain,
    d.deployment_id AS deployment_id,
    d.period_start AS period_start,
    d.period_end AS period_end,
    d.baseline_kwh AS baseline_kwh,
    d.actual_kwh AS actual_kwh,
    d.baseline_kwh - d.actual_kwh AS saved_kwh,
    d.method AS method,
    coalesce(nullif(lower(trim(d.meter)), ''), 'main') AS meter,
    -- the stated unit, else the meter's under the default [ledger] meter_units (docs/ledger.md "Units")
    CASE
        WHEN coalesce(d.unit, '') <> '' THEN lower(trim(d.unit))
        WHEN coalesce(nullif(lower(trim(d.meter)), ''), 'main') = 'main' THEN 'kwh-electric'
        WHEN lower(trim(d.meter)) = 'fuel' THEN 'kwh-fuel'
        ELSE ''
    END AS unit,
    event_id,
    event_at AS measured_at,
    source,
    seq
FROM src
