import builtins

run = builtins.__dict__.get("exec")
run("x = 1")
