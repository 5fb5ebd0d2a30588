import pickle

state = {"iteration": 10, "best": [1.0, 2.0]}
with open("cache/state.pkl", "wb") as fh:
    fh.write(pickle.dumps(state))
