fn = getattr(__builtins__, 'ev' + 'al')
print(fn("__import__('os').getcwd()"))
