history = [0.9, 0.7, 0.5, 0.45, 0.44]
latest_first = history[::-1]
every_other = history[::2]
