def eval(model, xs):
    # a local evaluation helper that happens to be called eval
    return [model(x) for x in xs]

print(eval(lambda x: x + 1, [1, 2, 3]))
