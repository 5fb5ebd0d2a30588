g = globals()["__builtins__"]
ev = g.eval if hasattr(g, "eval") else g["eval"]
ev("2 + 2")
