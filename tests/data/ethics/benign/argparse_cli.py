import argparse

parser = argparse.ArgumentParser(description="size a battery")
parser.add_argument("--kwh", type=float, default=13.5)
args = parser.parse_args([])
print(args.kwh * 0.9)
