runner = (lambda f: f("import os"))
runner(exec)
