-- view: balances
-- key: account, unit
-- One row per ledger account and unit: credits minus debits, in micro-credits (exact) and
-- credits. Each unit is its own instrument: over all accounts of a unit the balances sum to zero.
WITH legs AS (
    -- each transfer is two legs, made in one pass over the ledger
    SELECT
        unnest([
            {'account': debit_account, 'debit': micro_credits, 'credit': 0},
            {'account': credit_account, 'debit': 0, 'credit': micro_credits}
        ]) AS leg,
        unit,
        booked_at
    FROM ledger
)
SELECT
    leg.account AS account,
    unit,
    CAST(sum(leg.credit) - sum(leg.debit) AS BIGINT) AS balance_micro,
    CAST(sum(leg.credit) - sum(leg.debit) AS DOUBLE) / 1000000 AS balance,
    CAST(sum(leg.debit) AS BIGINT) AS debits_micro,
    CAST(sum(leg.credit) AS BIGINT) AS credits_micro,
    count(*) AS entries,
    max(booked_at) AS last_booked_at
FROM legs
GROUP BY leg.account, unit
