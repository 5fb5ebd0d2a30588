import pandas as pd

df = pd.DataFrame({"zone": ["a", "b", "a", "c"], "kwh": [10.0, 12.5, 9.0, 30.0]})
summary = df.groupby("zone")["kwh"].agg(["sum", "mean"])
summary.to_csv("summary.csv")
