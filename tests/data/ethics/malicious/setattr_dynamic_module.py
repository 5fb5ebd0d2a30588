import os

def patch(name, value):
    setattr(os, name, value)
