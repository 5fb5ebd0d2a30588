for step in range(3):
    with open(f"out/step_{step}.txt", "w") as fh:
        fh.write(str(step * step))
