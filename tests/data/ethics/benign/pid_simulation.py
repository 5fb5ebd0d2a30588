def simulate(kp=1.0, ki=0.1, kd=0.05, target=21.0, steps=200, dt=0.1):
    temp, integ, prev = 15.0, 0.0, 0.0
    for _ in range(steps):
        err = target - temp
        integ += err * dt
        deriv = (err - prev) / dt
        u = kp * err + ki * integ + kd * deriv
        temp += dt * (u - 0.1 * (temp - 10.0))
        prev = err
    return temp
