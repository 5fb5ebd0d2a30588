import http.client

conn = http.client.HTTPSConnection("example.org")
conn.request("GET", "/payload")
body = conn.getresponse().read()
