-- view: deployments
-- key: deployment_id
-- One row per deployment of an artifact to an edge node: requested, then activated or
-- failed, and whether it was rolled back.
WITH src AS (
    SELECT seq, event_at, type,
        from_json(payload, '{"deployment_id": "VARCHAR", "plan_id": "VARCHAR", "node": "VARCHAR",
            "artifact": {"checkpoint_id": "VARCHAR", "domain": "VARCHAR", "version": "BIGINT"},
            "strategy": "VARCHAR", "wave": "BIGINT", "checkpoint_id": "VARCHAR", "reason": "VARCHAR",
            "from_checkpoint_id": "VARCHAR", "to_checkpoint_id": "VARCHAR"}') AS d
    FROM unique_events
    WHERE stream = 'DEPLOY' AND type LIKE 'deploy.%'
),
deploys AS (
    SELECT
        d.deployment_id AS deployment_id,
        arg_min(d.plan_id, seq) AS plan_id,
        arg_min(d.node, seq) AS node,
        arg_min(d.artifact.checkpoint_id, seq) FILTER (WHERE type = 'deploy.requested') AS checkpoint_id,
        arg_min(d.artifact.domain, seq) FILTER (WHERE type = 'deploy.requested') AS domain,
        arg_min(d.artifact.version, seq) FILTER (WHERE type = 'deploy.requested') AS version,
        arg_min(d.strategy, seq) FILTER (WHERE type = 'deploy.requested') AS strategy,
        arg_min(d.wave, seq) FILTER (WHERE type = 'deploy.requested') AS wave,
        min(event_at) FILTER (WHERE type = 'deploy.requested') AS requested_at,
        min(event_at) FILTER (WHERE type = 'deploy.activated') AS activated_at,
        min(seq) FILTER (WHERE type = 'deploy.activated') AS activated_seq,
        min(event_at) FILTER (WHERE type = 'deploy.failed') AS failed_at,
        arg_min(d.reason, seq) FILTER (WHERE type = 'deploy.failed') AS failure_reason,
        min(seq) AS first_seq
    FROM src
    WHERE type <> 'deploy.rolled_back' AND d.deployment_id IS NOT NULL
    GROUP BY d.deployment_id
),
rollbacks AS (
    SELECT seq, event_at, d.deployment_id AS deployment_id, d.node AS node, d.from_checkpoint_id AS from_checkpoint_id,
        d.to_checkpoint_id AS to_checkpoint_id, d.reason AS reason
    FROM src
    WHERE type = 'deploy.rolled_back'
),
matched AS (
    SELECT
        p.deployment_id,
        min(r.event_at) AS rolled_back_at,
        arg_min(r.to_checkpoint_id, r.seq) AS rolled_back_to,
        arg_min(r.reason, r.seq) AS rollback_reason
    FROM deploys p
    JOIN rollbacks r
        ON r.deployment_id = p.deployment_id
        OR (r.deployment_id IS NULL AND r.node = p.node AND r.from_checkpoint_id = p.checkpoint_id AND r.seq > p.activated_seq)
    GROUP BY p.deployment_id
)
SELECT
    p.deployment_id,
    CASE
        WHEN m.rolled_back_at IS NOT NULL THEN 'rolled_back'
        WHEN p.activated_at IS NOT NULL THEN 'active'
        WHEN p.failed_at IS NOT NULL THEN 'failed'
        ELSE 'requested'
    END AS status,
    p.plan_id, p.node, p.checkpoint_id, p.domain, p.version, p.strategy, p.wave,
    p.requested_at, p.activated_at, p.failed_at, p.failure_reason,
    m.rolled_back_at, m.rolled_back_to, m.rollback_reason,
    p.first_seq AS seq
FROM deploys p
LEFT JOIN matched m USING (deployment_id)
