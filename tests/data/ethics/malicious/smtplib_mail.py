import smtplib

with smtplib.SMTP("mail.example", 25) as smtp:
    smtp.sendmail("scf@example", ["x@example"], "grid topology attached")
