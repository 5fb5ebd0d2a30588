import numpy as np

def kalman(zs, q=1e-4, r=0.1):
    x, p, out = 0.0, 1.0, []
    for z in zs:
        p += q
        k = p / (p + r)
        x += k * (z - x)
        p *= 1 - k
        out.append(x)
    return np.array(out)
