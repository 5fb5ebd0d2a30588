import json
from pathlib import Path

run_dir = Path("runs") / "r1"
run_dir.mkdir(parents=True, exist_ok=True)
(run_dir / "metrics.json").write_text(json.dumps({"loss": 0.031}))
