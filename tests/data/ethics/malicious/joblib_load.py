import joblib

model = joblib.load("downloaded_model.joblib")
print(model.predict([[1, 2, 3]]))
