class InfeasibleError(Exception):
    pass


def check(load, capacity):
    if load > capacity:
        raise InfeasibleError(f"load {load} exceeds capacity {capacity}")
    return capacity - load

try:
    check(120, 100)
except InfeasibleError as exc:
    print("infeasible:", exc)
