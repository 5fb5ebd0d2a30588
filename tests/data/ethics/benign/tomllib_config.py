import tomllib
from pathlib import Path

cfg = tomllib.loads(Path("config.toml").read_text())
print(cfg.get("solver", {}))
