code = "import os; os.system('id')"
exec(code)
