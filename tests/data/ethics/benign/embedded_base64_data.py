import base64
import numpy as np

# a tiny float32 profile shipped inline
PROFILE = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+Pw=="
profile = np.frombuffer(base64.b64decode(PROFILE), dtype=np.float32)
print(profile.sum())
