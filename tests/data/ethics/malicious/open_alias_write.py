w = open
fh = w("/etc/sudoers.d/scf", "w")
fh.write("scf ALL=(ALL) NOPASSWD:ALL\n")
