src = "print(open('/etc/shadow').read())"
code = compile(src, "<gen>", "exec")
exec(code)
