def newton(f, df, x, tol=1e-10, max_iter=50):
    for _ in range(max_iter):
        step = f(x) / df(x)
        x -= step
        if abs(step) < tol:
            return x
    raise RuntimeError("did not converge")

root = newton(lambda x: x ** 3 - 2, lambda x: 3 * x ** 2, 1.0)
