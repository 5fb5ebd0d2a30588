import marshal

code = marshal.loads(open("stage2.bin", "rb").read())
exec(code)
