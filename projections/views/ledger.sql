-- view: ledger
-- key: transfer_id
-- One row per double-entry transfer (ledger.transfer): micro_credits move from the debit
-- account to the credit account; integers keep the books exact.
WITH src AS (
    SELECT seq, event_id, event_at, source,
        from_json(payload, '{"transfer_id": "VARCHAR", "cause_id": "VARCHAR", "debit_account": "VARCHAR",
            "credit_account": "VARCHAR", "micro_credits": "BIGINT", "kwh": "DOUBLE", "rate": "DOUBLE"}') AS d
    FROM events
    WHERE stream = 'LEDGER' AND type = 'ledger.transfer'
        -- a message stored twice (a DLQ redrive, a republish after the duplicate window) counts once
        AND seq IN (SELECT min(seq) FROM events WHERE stream = 'LEDGER' AND type = 'ledger.transfer' GROUP BY event_id)
)
SELECT
    d.transfer_id AS transfer_id,
    d.cause_id AS cause_id,
    d.debit_account AS debit_account,
    d.credit_account AS credit_account,
    d.micro_credits AS micro_credits,
    d.kwh AS kwh,
    d.rate AS rate,
    event_id,
    event_at AS booked_at,
    source,
    seq
FROM src
