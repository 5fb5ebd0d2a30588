import torch

state = torch.load("checkpoints/model.pt", weights_only=True)
print(sorted(state))
