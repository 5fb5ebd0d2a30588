from urllib.parse import urlencode, quote

query = urlencode({"zone": "north", "from": "2026-01-01"})
safe = quote("grid case 14")
