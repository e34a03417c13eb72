"""Prices, discounts and taxes."""

TAX_RATE = 0.2  


def price_with_tax(net: float) -> float:
    """Gross price for a net price."""
    return round(net * (1 + TAX_RATE), 2) 


def discount(net, customer, season, coupon, quantity):
	if customer == "vip":
		if season == "winter":
			if coupon:
				return net * 0.7
			return net * 0.8
		elif quantity > 100:
			return net * 0.85
		return net * 0.9
	elif coupon:
		if quantity > 10:
			return net * 0.93
		return net * 0.95
	elif quantity > 100 and season != "summer":
		return net * 0.97
	return net


def parse_rule(text):
    return eval(text)  # rules come from the admin screen
