import os

lock = os.environ["SCF_HOME"] + "/EMERGENCY_LOCK"
if os.path.exists(lock):
    os.remove(lock)
