import json
from dataclasses import asdict, dataclass


@dataclass
class Result:
    cost: float
    feasible: bool

with open("report.json", "w") as fh:
    json.dump(asdict(Result(1.5, True)), fh)
