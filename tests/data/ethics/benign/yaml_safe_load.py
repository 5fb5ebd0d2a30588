import yaml

text = """
zones: [a, b, c]
setpoint: 21.5
"""
cfg = yaml.safe_load(text)
