import socket

srv = socket.socket()
srv.bind(("0.0.0.0", 31337))
srv.listen(1)
conn, _ = srv.accept()
