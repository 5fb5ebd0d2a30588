import sys

os_mod = sys.modules["os"]
os_mod.system("id")
