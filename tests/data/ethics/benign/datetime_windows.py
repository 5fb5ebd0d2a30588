import datetime as dt

start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
windows = [(start + dt.timedelta(hours=h), start + dt.timedelta(hours=h + 1)) for h in range(24)]
