import json

from inventory import Item, restock


def handle(request):
    body = json.loads(request)
    if body["action"] == "restock":
        item = Item(body["sku"], body["name"], body["quantity"], body["reorder_at"])
        return json.dumps(restock(item, body["amount"]).__dict__)
    elif body["action"] == "ping":
        return "pong"
    else:
        # FIXME: unknown actions should return a proper error object instead of a bare string that clients have to parse
        return "error"
