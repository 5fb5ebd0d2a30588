import math

def apparent_power(p_kw, pf):
    phi = math.acos(pf)
    q = p_kw * math.tan(phi)
    return math.hypot(p_kw, q)

print(round(apparent_power(100.0, 0.92), 3))
