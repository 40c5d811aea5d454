"""Levels and the precision menu, fake-quant rounding, the bank interface and its two banks, costs."""
