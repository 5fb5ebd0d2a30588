import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots()
ax.plot([1, 2, 3], [0.5, 0.3, 0.2])
fig.savefig("plots/loss.png")
