from collections import Counter

events = ["trip", "ok", "ok", "trip", "ok", "alarm"]
counts = Counter(events)
print(counts.most_common(2))
