-- view: ledger
-- key: transfer_id
-- One row per double-entry transfer (ledger.transfer): micro_credits of one unit (kWh of
-- electricity, kWh of fuel) move from the debit account to the credit account; integers keep
-- the books exact; credits of different units are never added together.
WITH src AS (
    SELECT seq, event_id, event_at, source,
        from_json(payload, '{"transfer_id": "VARCHAR", "cause_id": "VARCHAR", "debit_account": "VARCHAR",
            "credit_account": "VARCHAR", "micro_credits": "BIGINT", "kwh": "DOUBLE", "rate": "DOUBLE",
            "unit": "VARCHAR", "node": "VARCHAR", "meter": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'LEDGER' AND type = 'ledger.transfer'
)
SELECT
    d.transfer_id AS transfer_id,
    d.cause_id AS cause_id,
    d.debit_account AS debit_account,
    d.credit_account AS credit_account,
    d.micro_credits AS micro_credits,
    coalesce(d.unit, '') AS unit,
    d.kwh AS kwh,
    d.rate AS rate,
    coalesce(d.node, '') AS node,
    coalesce(d.meter, '') AS meter,
    event_id,
    event_at AS booked_at,
    source,
    seq
FROM src
