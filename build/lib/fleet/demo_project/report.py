"""Human-readable stock reports."""

from inventory import Item, low_stock


def line(item: Item) -> str:
    """One report line for an item."""
    return f"{item.sku:<10} {item.name:<30} {item.quantity:>6}"


def report(items: list[Item]) -> str:
    """The full report: every item, then the ones to reorder."""
    lines = [line(item) for item in items]
    lines.append("")
    lines.append("to reorder: " + ", ".join(item.sku for item in low_stock(items)))
    return "\n".join(lines)
