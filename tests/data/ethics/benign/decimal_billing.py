from decimal import Decimal, ROUND_HALF_UP

kwh = Decimal("1234.567")
price = Decimal("0.1875")
bill = (kwh * price).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
