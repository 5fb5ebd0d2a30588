name = "".join([chr(101), chr(118), chr(97), chr(108)])
f = getattr(__builtins__, name)
f("1 + 1")
