import random

def evolve(fitness, n=20, genes=8, gens=30, seed=1):
    rng = random.Random(seed)
    pop = [[rng.random() for _ in range(genes)] for _ in range(n)]
    for _ in range(gens):
        pop.sort(key=fitness)
        parents = pop[: n // 2]
        children = [[(a + b) / 2 + rng.gauss(0, 0.05) for a, b in zip(*rng.sample(parents, 2))] for _ in range(n - len(parents))]
        pop = parents + children
    return min(pop, key=fitness)
