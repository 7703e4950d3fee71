"""End-to-end tests: a live consortium, the portal in a browser, the compose and deploy files."""
