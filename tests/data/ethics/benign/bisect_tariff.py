import bisect

bands = [0, 100, 300, 1000]
rates = [0.10, 0.15, 0.22, 0.30]

def rate(kwh):
    return rates[bisect.bisect_right(bands, kwh) - 1]
