import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import spsolve

n = 50
L = sp.diags([-1, 2, -1], [-1, 0, 1], shape=(n, n), format="csc")
x = spsolve(L, np.ones(n))
