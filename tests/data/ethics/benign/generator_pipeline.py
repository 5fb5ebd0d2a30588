def readings(n):
    for i in range(n):
        yield i * 0.5

def smoothed(xs, alpha=0.3):
    s = None
    for x in xs:
        s = x if s is None else alpha * x + (1 - alpha) * s
        yield s

print(list(smoothed(readings(5))))
