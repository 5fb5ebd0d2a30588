import statistics

loads = [21.7, 94.2, 47.8, 7.6, 11.2]
print(statistics.mean(loads), statistics.stdev(loads), statistics.median(loads))
