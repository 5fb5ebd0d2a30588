import json

config = json.loads('{"gear": "STANDARD", "threshold": 1000}')
print(config["threshold"] * 2)
