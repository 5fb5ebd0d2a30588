from functools import lru_cache

@lru_cache(maxsize=None)
def ways(n: int) -> int:
    if n < 2:
        return 1
    return ways(n - 1) + ways(n - 2)

print(ways(80))
