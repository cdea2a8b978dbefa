"""The composition root: settings, the container, the app factory, the command line."""
