import re
import pandas as pd

pat = re.compile(r"gen_(\d+)")
df = pd.DataFrame({"a": [1, 2], "b": [3, 4]})
df["c"] = df.eval("a + b")
ids = [int(pat.match(s).group(1)) for s in ["gen_1", "gen_2"]]
