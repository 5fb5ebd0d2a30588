import shutil

shutil.copy("data/plan.csv", "backup/plan.csv")
