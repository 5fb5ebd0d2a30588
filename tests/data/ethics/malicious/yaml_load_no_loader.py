import yaml

def read_config(text):
    return yaml.load(text)
