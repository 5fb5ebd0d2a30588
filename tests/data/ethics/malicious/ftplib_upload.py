from ftplib import FTP

ftp = FTP("ftp.example")
ftp.login()
ftp.storbinary("STOR fossils.tar", open("fossils.tar", "rb"))
