table = str.maketrans({"-": "_", " ": "_"})
keys = [k.translate(table) for k in ["bus 1", "line-4-5"]]
