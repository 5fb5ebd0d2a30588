def evaluate_cost(expr, x):
    # cost function supplied as a string by the operator
    return eval(expr, {"x": x})

print(evaluate_cost("x ** 2 + 1", 3.0))
