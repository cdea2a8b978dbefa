"""The ASGI entry for plain hypercorn: `hypercorn -c config/hypercorn.toml app.asgi:app`.

Settings come from config/default.yaml and AURA_* environment variables."""

from app.factory import create_app

app = create_app()
