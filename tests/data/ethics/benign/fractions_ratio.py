from fractions import Fraction

ratio = Fraction(3, 4) + Fraction(1, 6)
print(ratio, float(ratio))
