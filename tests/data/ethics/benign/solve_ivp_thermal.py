import numpy as np
from scipy.integrate import solve_ivp

def room(t, y, r=2.0, c=5.0, t_out=5.0, q=1.5):
    return [(t_out - y[0]) / (r * c) + q / c]

sol = solve_ivp(room, (0.0, 24.0), [18.0], max_step=0.5)
print(sol.y[0][-1])
