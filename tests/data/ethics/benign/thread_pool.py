from concurrent.futures import ThreadPoolExecutor

def evaluate(x):
    return (x - 2) ** 2

with ThreadPoolExecutor(max_workers=4) as pool:
    scores = list(pool.map(evaluate, range(10)))
