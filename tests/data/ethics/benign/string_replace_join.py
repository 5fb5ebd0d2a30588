name = "grid:case14"
token = name.replace(":", "_")
label = " / ".join(part.upper() for part in name.split(":"))
