def gd(grad, x0, lr=0.1, steps=100):
    x = x0
    for _ in range(steps):
        x = x - lr * grad(x)
    return x

print(gd(lambda x: 2 * (x - 3.0), 0.0))
