import base64
import json

blob = bytes(range(16))
doc = json.dumps({"state": base64.b64encode(blob).decode("ascii")})
