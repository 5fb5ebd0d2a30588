from ctypes import cdll, c_char_p

lib = cdll.LoadLibrary("./libfast.so")
lib.run(c_char_p(b"go"))
