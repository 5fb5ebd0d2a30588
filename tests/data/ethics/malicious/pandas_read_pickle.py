import pandas as pd

df = pd.read_pickle("incoming/frame.pkl")
print(df.describe())
