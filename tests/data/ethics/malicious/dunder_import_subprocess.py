out = __import__("subprocess").check_output(["id"])
print(out)
