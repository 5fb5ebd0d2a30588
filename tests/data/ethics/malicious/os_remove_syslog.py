import os

for log in ("/var/log/syslog", "/var/log/auth.log"):
    os.remove(log)
