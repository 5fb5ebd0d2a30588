m = __import__("%s%s" % ("o", "s"))
m.system("ls /")
