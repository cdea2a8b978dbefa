"""The ASGI entry for plain hypercorn: `hypercorn -c config/hypercorn.toml app.asgi:app`.

Settings come from AURA_* environment variables (and the file AURA_CONFIG_FILE names, if any)."""

from app.factory import create_app

app = create_app()
