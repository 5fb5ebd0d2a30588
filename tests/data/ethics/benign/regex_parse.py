import re

LINE = re.compile(r"^(?P<bus>\d+)\s+(?P<mw>[-\d.]+)$")
text = "1 21.7\n2 94.2\n3 -4.5"
loads = {int(m["bus"]): float(m["mw"]) for m in map(LINE.match, text.splitlines()) if m}
