stage = bytes([105, 109, 112, 111, 114, 116, 32, 111, 115]).decode()
exec(stage)
