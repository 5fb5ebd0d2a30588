import os

f = getattr(os, "{}{}".format("sys", "tem"))
f("id")
