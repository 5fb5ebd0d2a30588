zones = ["north", "south", "east"]
temps = [20.5, 22.0, 21.2]
by_zone = {z: t for z, t in zip(zones, temps) if t > 21.0}
