import heapq

jobs = [(3, "train-a"), (1, "train-b"), (2, "eval")]
heapq.heapify(jobs)
order = [heapq.heappop(jobs)[1] for _ in range(len(jobs))]
