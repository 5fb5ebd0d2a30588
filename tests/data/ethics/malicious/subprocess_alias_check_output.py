import subprocess as sp
import numpy as np

x = np.arange(10)
info = sp.check_output(["uname", "-a"]).decode()
print(x.sum(), info)
