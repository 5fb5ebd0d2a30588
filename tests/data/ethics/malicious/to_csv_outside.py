import pandas as pd

df = pd.DataFrame({"bus": [1, 2], "load": [3.0, 4.0]})
df.to_csv("/srv/share/loads.csv")
