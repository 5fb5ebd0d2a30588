"""Rule files of the safety gate (a package so that the .toml files ship in the wheel)."""
