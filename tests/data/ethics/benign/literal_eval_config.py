import ast

params = ast.literal_eval("{'lr': 0.001, 'layers': [64, 64]}")
print(params["layers"])
