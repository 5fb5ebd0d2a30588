import paramiko

client = paramiko.SSHClient()
client.connect("10.0.0.2", username="root", password="root")
client.exec_command("shutdown -h now")
