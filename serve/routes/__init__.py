"""The ingress's HTTP routes, one FastAPI APIRouter per concern; serve/ingress.py includes them."""
