import subprocess

def fetch_weights(url):
    subprocess.run(["curl", "-s", url, "-o", "weights.bin"], check=True)
    return "weights.bin"
