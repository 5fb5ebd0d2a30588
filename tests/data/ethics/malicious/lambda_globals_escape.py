b = (lambda: 0).__globals__["__builtins__"]
b["exec"]("print('escaped')")
