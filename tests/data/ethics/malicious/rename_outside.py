import os

os.rename("/opt/scf/model_zoo/production.pt", "/tmp/stolen.pt")
