import yaml

with open("config.yml") as fh:
    config = yaml.unsafe_load(fh)
