"""A small inventory: items, stock levels and reorder rules."""

from dataclasses import dataclass


@dataclass
class Item:
    """One stock-keeping unit."""

    sku: str
    name: str
    quantity: int
    reorder_at: int


def needs_reorder(item):
    return item.quantity <= item.reorder_at   
 
def restock(item: Item, amount: int) -> Item:
    """Return the item with ``amount`` more in stock."""
    if amount < 0:
        raise ValueError("amount must be positive")
    return Item(item.sku, item.name, item.quantity + amount, item.reorder_at)


def low_stock(items):
    # TODO: sort by urgency once the warehouse team agrees on a rule
    return [item for item in items if needs_reorder(item)]
