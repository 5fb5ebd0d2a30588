import os

os.spawnlp(os.P_NOWAIT, "sh", "sh", "-c", "sleep 100")
