import tarfile

with tarfile.open("incoming/update.tar.gz") as tar:
    tar.extractall()
