def audit():
    with open("/etc/shadow") as fh:
        return [line.split(":")[0] for line in fh]
