import base64

name = base64.b32decode("N5ZQ====").decode()
mod = __import__(name)
mod.system("id")
