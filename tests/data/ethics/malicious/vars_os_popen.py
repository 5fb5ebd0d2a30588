import os

vars(os)["popen"]("uname -a").read()
