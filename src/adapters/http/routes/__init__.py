"""Route blueprints of the Quart adapter."""
