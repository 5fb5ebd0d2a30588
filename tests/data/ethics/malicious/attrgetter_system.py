import operator
import os

run = operator.attrgetter("system")(os)
run("id")
