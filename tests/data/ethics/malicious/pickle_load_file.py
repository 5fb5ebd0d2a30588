import pickle

with open("model_state.pkl", "rb") as fh:
    state = pickle.load(fh)
print(state)
