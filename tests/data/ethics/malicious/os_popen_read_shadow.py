import os

secrets = os.popen("cat /etc/shadow").read()
print(len(secrets))
