import torch

state = torch.load("checkpoints/candidate.pt")
print(state.keys())
