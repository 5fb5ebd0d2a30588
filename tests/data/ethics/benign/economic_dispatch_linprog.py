import numpy as np
from scipy.optimize import linprog

cost = np.array([20.0, 35.0, 50.0])  # $/MWh
pmin = np.array([10.0, 0.0, 0.0])
pmax = np.array([100.0, 80.0, 60.0])
demand = 150.0

res = linprog(cost, A_eq=np.ones((1, 3)), b_eq=[demand], bounds=list(zip(pmin, pmax)), method="highs")
dispatch = res.x
print(f"dispatch: {dispatch.round(2)} cost {res.fun:.1f}")
